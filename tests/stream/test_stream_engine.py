"""The streaming engine: one chunk with the full cache is the bidirectional sampler, a window
that holds everything is the full cache, memory stays flat, a closed stream gives the model back
exactly, and bad requests are refused before anything is generated."""

import pytest
import torch
from conftest import text, tiny_wan
from diffusers import FlowMatchEulerDiscreteScheduler

from cadence.accel.sequence import FullConfig, KVFormatConfig, SinkWindowConfig, WindowConfig
from cadence.accel.sequence._base import KV_CACHE, apply_policy
from cadence.reference.pipelines import RefVideoPipeline
from cadence.stream import StreamChunk, stream

SIZE = {"height": 8, "width": 8}


def _pipe() -> RefVideoPipeline:
    pipe = RefVideoPipeline(transformer=tiny_wan(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _forward(model) -> torch.Tensor:
    x = torch.randn(1, 3, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        return model(hidden_states=x, timestep=torch.tensor([300.0]), encoder_hidden_states=text(),
                     return_dict=False)[0]


def test_one_chunk_with_the_full_cache_is_the_bidirectional_sampler():
    pipe = _pipe()
    expected = pipe(prompt_embeds=text(), steps=4, guidance_scale=1.0, frames=3, seed=7, **SIZE).frames
    (chunk,) = stream(pipe, text(), chunks=1, frames_per_chunk=3, steps_per_chunk=4, policy=FullConfig(), seed=7,
                      **SIZE)
    assert isinstance(chunk, StreamChunk) and chunk.frames.shape == expected.shape == (1, 3, 3, 8, 8)
    torch.testing.assert_close(chunk.frames, expected, rtol=0, atol=1e-6)


def test_a_window_that_holds_everything_is_the_full_cache_exactly():
    pipe, call = _pipe(), {"chunks": 3, "steps_per_chunk": 2, **SIZE}
    full = list(stream(pipe, text(), policy=FullConfig(cap_frames=6), **call))
    window = list(stream(pipe, text(), policy=WindowConfig(frames=6), **call))
    for a, b in zip(full, window):
        assert torch.equal(a.latents, b.latents) and a.kept_frames == b.kept_frames
    # and a window that drops frames is not (the comparison can fail)
    short = list(stream(pipe, text(), policy=WindowConfig(frames=3), **call))
    assert torch.equal(short[1].latents, full[1].latents) and not torch.equal(short[2].latents, full[2].latents)


def test_kv_bytes_stay_flat_with_a_window_over_many_chunks():
    chunks = list(stream(_pipe(), text(), chunks=10, frames_per_chunk=3, steps_per_chunk=1,
                         policy=SinkWindowConfig(sink=3, frames=6), **SIZE))
    assert [c.kept_frames[:3] for c in chunks[1:]] == [[0, 1, 2]] * 9  # the sink stays
    assert [len(c.kept_frames) for c in chunks] == [3, 6, 9, 9, 9, 9, 9, 9, 9, 9]
    assert chunks[-1].kept_frames == [0, 1, 2, 21, 22, 23, 24, 25, 26]
    assert len({c.kv_bytes for c in chunks[2:]}) == 1 and chunks[2].kv_bytes == 3 * chunks[0].kv_bytes


def test_int8_kv_streams_in_about_half_the_memory():
    pipe = _pipe()
    native = list(stream(pipe, text(), chunks=3, steps_per_chunk=2, policy=WindowConfig(frames=6), **SIZE))
    int8 = list(stream(pipe, text(), chunks=3, steps_per_chunk=2, policy=WindowConfig(frames=6),
                       kv_format=KVFormatConfig(format="int8"), **SIZE))
    assert int8[1].kv_bytes == native[1].kv_bytes * (1 + 4 / 12) / 4  # a byte a number + 4 a row, vs float32
    assert torch.equal(int8[0].latents, native[0].latents)  # the first chunk reads no cache
    assert torch.isfinite(int8[-1].latents).all()


def test_a_closed_stream_leaves_the_model_exactly_restored():
    pipe = _pipe()
    model = pipe.transformer
    before, processors = _forward(model), [block.attn1.processor for block in model.blocks]
    chunks = stream(pipe, text(), steps_per_chunk=1, **SIZE)  # unbounded
    assert [block.attn1.processor for block in model.blocks] == processors  # nothing installed before next()
    first, second = next(chunks), next(chunks)
    assert second.first_frame == 3 and not hasattr(first, "close")
    assert hasattr(model, KV_CACHE)
    chunks.close()
    assert [block.attn1.processor for block in model.blocks] == processors
    assert not hasattr(model, KV_CACHE) and not model._forward_pre_hooks
    assert torch.equal(_forward(model), before)


def test_a_stream_uses_the_terms_the_model_carries_and_leaves_them():
    pipe = _pipe()
    handle = apply_policy(pipe.transformer, WindowConfig(frames=3))
    chunks = list(stream(pipe, text(), chunks=3, steps_per_chunk=1, **SIZE))
    assert chunks[1].kept_frames == [3, 4, 5]
    cache = getattr(pipe.transformer, KV_CACHE)
    assert cache.policy == WindowConfig(frames=3) and cache.bytes() == 0  # terms stay, the stream's memory goes
    with pytest.raises(ValueError, match=r"already carries the KV cache terms kv-window\(frames=3\)"):
        stream(pipe, text(), chunks=1, policy=FullConfig(), **SIZE)
    handle.remove()


@pytest.mark.parametrize("kwargs, message", [
    ({"chunks": 0}, r"chunks=0; valid: an int >= 1, or None"),
    ({"frames_per_chunk": 0}, r"frames_per_chunk=0; valid: an int >= 1"),
    ({"steps_per_chunk": 1.5}, r"steps_per_chunk=1.5; valid: an int >= 1"),
    ({"policy": WindowConfig(frames=2)}, r"frames=2 is shorter than one chunk \(frames_per_chunk=3\)"),
    ({"chunks": 4, "policy": FullConfig(cap_frames=6)}, r"reached 9 cached frames, over cap_frames=6"),
    ({"policy": SinkWindowConfig(sink=20, frames=12)},
     r"keeps up to 32 frames and a chunk adds 3.*rotary table of 32.*at most 29 cached frames"),
    ({"height": 7}, r"height=7, width=8; valid: positive multiples of the patch size 2x2"),
    ({"policy": "window"}, r"policy='window'; valid: FullConfig, WindowConfig, SinkWindowConfig or PackConfig"),
])
def test_bad_requests_are_refused_before_anything_is_generated(kwargs, message):
    pipe = _pipe()
    with pytest.raises((ValueError, TypeError), match=message):
        stream(pipe, text(), **{**SIZE, **kwargs})
    assert not hasattr(pipe.transformer, KV_CACHE)


def test_compiled_blocks_stream_exactly_as_eager_in_one_graph():
    from cadence.accel.registry import get_technique

    model, call = tiny_wan(), {"chunks": 2, "steps_per_chunk": 1, "policy": WindowConfig(frames=3),
                               "kv_format": KVFormatConfig(format="int8"), **SIZE}
    eager = [chunk.latents for chunk in stream(model, text(), **call)]
    technique = get_technique("compile")
    handle = technique.apply(model, technique.config(backend="aot_eager"))
    torch._dynamo.reset()  # graphs compiled by earlier tests of the suite would be reused and not counted
    torch._dynamo.utils.counters.clear()
    compiled = [chunk.latents for chunk in stream(model, text(), **call)]
    handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # the cache's growth recompiles nothing
    assert not torch._dynamo.utils.counters["graph_break"]


def test_registered_terms_parse_apply_through_accelerate_and_stream(monkeypatch):
    from cadence.accel import registry
    from cadence.accel.sequence import register_terms
    from cadence.recipe import Recipe, accelerate

    monkeypatch.setattr(registry, "TECHNIQUES", dict(registry.load_builtin()))  # this test's registry only
    register_terms()
    recipe = Recipe.parse("kv-sink-window(sink=3, frames=3) + kv-format(format='fp8')")
    assert recipe == Recipe([SinkWindowConfig(sink=3, frames=3), KVFormatConfig(format="fp8")])
    assert Recipe.parse(str(recipe)) == recipe
    model = tiny_wan()
    before = _forward(model)
    acceleration = accelerate(model, recipe)
    chunks = list(stream(model, text(), chunks=4, steps_per_chunk=1, **SIZE))
    assert chunks[-1].kept_frames == [0, 1, 2, 6, 7, 8]
    acceleration.remove()
    assert not hasattr(model, KV_CACHE) and torch.equal(_forward(model), before)


def test_a_vae_pipelines_chunks_decode_as_the_whole_video_would():
    from tiny_checkpoints import TEXT_DIM, tiny_wan_pipeline

    pipe = tiny_wan_pipeline()  # Wan's VAE: 8x in space, 4x in time
    embeds = torch.randn(1, 4, TEXT_DIM, generator=torch.Generator().manual_seed(0))
    chunks = list(stream(pipe, embeds, chunks=2, frames_per_chunk=2, steps_per_chunk=1, policy=WindowConfig(frames=2),
                         height=2, width=2))
    assert [c.frames.shape[1] for c in chunks] == [1 + 4, 4 + 4]  # 1 video frame for the first latent, then 4
    vae = pipe.vae
    shape = (1, vae.config.z_dim, 1, 1, 1)
    latents = torch.cat([c.latents for c in chunks], dim=2)
    latents = latents * torch.tensor(vae.config.latents_std).view(shape) + torch.tensor(vae.config.latents_mean).view(
        shape)
    whole = vae.decode(latents, return_dict=False)[0].permute(0, 2, 1, 3, 4)  # (B, T, 3, H, W)
    torch.testing.assert_close(torch.cat([c.frames for c in chunks], dim=1), whole, rtol=1e-5, atol=1e-6)
    assert all(entry is None for entry in vae._feat_map)  # the VAE's cache left as its own decode leaves it
