"""kv-sparse: each chunk reads the sink, the recent and the ``frames`` cached frames of highest mean
logit, per layer and head. Covering every cached frame it is the dense cache bit for bit; a chosen
subset is dense attention with the other frames masked out; a frame not chosen is never read;
its score is the mean logit the attention would see; it composes with the policies, kv-pack and
kv-format; taking it off gives back the cache that never had it, and the model; it refuses bad
knobs, a second selection, a cache already filled without it and a cache without a policy."""

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import TEXT_DIM, seeded_randn, text, tiny_wan
from diffusers import FlowMatchEulerDiscreteScheduler

import cadence
from cadence.accel.sequence import FullConfig, KVFormatConfig, SinkWindowConfig, SparseConfig
from cadence.accel.sequence import sparse as sparse_module
from cadence.accel.sequence._base import KV_CACHE, apply_format, apply_policy, apply_sparse
from cadence.accel.sequence.rope import rotate
from cadence.recipe import Recipe
from cadence.stream import stream

SIZE = {"height": 8, "width": 8}  # 4 x 4 patches: 16 tokens a frame
CALL = {"steps_per_chunk": 1, **SIZE}
LAYERS, HEADS, DIM = 3, 2, 12


def _latents(model, chunks=6, policy=None, **kwargs):
    return [chunk.latents for chunk in stream(model, text(), chunks=chunks, policy=policy, **CALL, **kwargs)]


def _forward(model, x, seed=0) -> torch.Tensor:
    with torch.no_grad():
        return model(
            hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text(seed=seed), return_dict=False
        )[0]


def _filled(model, chunks: int):
    """The model's cache after ``chunks`` chunks of 3 frames written by hand (write forwards + commit)."""
    cache = getattr(model, KV_CACHE)
    for seed in range(chunks):
        cache.set_mode("write")
        _forward(model, seeded_randn(1, 3, 3, 8, 8, seed=seed))
        cache.commit()
    return cache


# -- the exactness bounds ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy, sparse",
    [
        ("kv-full", "kv-sparse(frames=20)"),
        ("kv-sink-window(sink=3, frames=6)", "kv-sparse(frames=3, sink=3, recent=3)"),
        ("kv-pack(sink=1, frames=3, mid=3, ratio=2)", "kv-sparse(frames=0, sink=1, recent=3)"),
    ],
    ids=["full", "sink-window", "pack"],
)
def test_covering_every_cached_frame_is_the_dense_cache_bit_for_bit(policy, sparse):
    model = tiny_wan()
    dense = _latents(model, policy=Recipe.parse(policy).techniques[0])
    acceleration = cadence.accelerate(model, f"{policy} + {sparse}")
    chosen = _latents(model)
    stats = acceleration.handles[-1].stats()
    acceleration.remove()
    assert all(torch.equal(a, b) for a, b in zip(dense, chosen))
    assert stats["kv_sparse_read_share"] == 1.0 and stats["kv_sparse_frames_read"] > 0


def test_it_equals_the_dense_cache_until_a_chunk_has_more_frames_than_it_reads_then_not():
    # kv-full: chunk c sees 3c frames; sink 1 + recent 2 + frames 3 = 6 read: chunks 0..2 exact, 3.. not
    model = tiny_wan()
    dense = _latents(model, policy=FullConfig())
    acceleration = cadence.accelerate(model, "kv-full + kv-sparse(frames=3, sink=1, recent=2)")
    chosen = _latents(model)
    acceleration.remove()
    assert [torch.equal(a, b) for a, b in zip(dense, chosen)] == [True] * 3 + [False] * 3


@pytest.mark.parametrize("backend", ["", "attention-backend(backend='math') + "], ids=["sdpa", "math-backend"])
def test_the_gathered_path_reading_every_frame_is_the_dense_cache_bit_for_bit(monkeypatch, backend):
    # the gather path itself (per-head frames, their rotation) forced to read every frame, in order; beside a
    # dense attention-backend term its backend answers the call over the gathered frames, as over the cache
    def every(self, scores):
        batch, heads, cached = scores.shape
        return torch.arange(cached).expand(batch, heads, cached)

    model = tiny_wan()
    dense_terms = cadence.accelerate(model, f"{backend}kv-sink-window(sink=1, frames=6)")
    dense = _latents(model)
    dense_terms.remove()
    monkeypatch.setattr(SparseConfig, "choose", every)
    acceleration = cadence.accelerate(model, f"{backend}kv-sink-window(sink=1, frames=6) + kv-sparse")
    chosen = _latents(model)
    acceleration.remove()
    assert all(torch.equal(a, b) for a, b in zip(dense, chosen))


def _chosen_calls(monkeypatch) -> list:
    """The frames kv-sparse chooses, call by call (None: every frame)."""
    calls, choose = [], SparseConfig.choose

    def recording(self, scores):
        calls.append(choose(self, scores))
        return calls[-1]

    monkeypatch.setattr(SparseConfig, "choose", recording)
    return calls


def test_a_chosen_subset_is_dense_attention_with_the_other_frames_masked_and_scored_by_mean_logit(monkeypatch):
    model = tiny_wan()
    handles = [apply_policy(model, FullConfig()), apply_sparse(model, SparseConfig(frames=2, sink=1, recent=1))]
    cache = _filled(model, 3)  # 9 frames: 1 sink, 1 recent, 2 of the 7 between chosen per head
    scores, score = [], SparseConfig.score
    monkeypatch.setattr(SparseConfig, "score", lambda self, *a: scores.append(score(self, *a)) or scores[-1])
    calls = _chosen_calls(monkeypatch)
    q, k, v = (seeded_randn(1, HEADS, 3 * 16, DIM, seed=seed) for seed in (10, 11, 12))  # a chunk of 3 frames
    cache.set_mode("read")
    out = cache.attend(1, q, k, v, None)
    chosen = calls[0]  # (B, H, 4)
    assert chosen.shape == (1, HEADS, 4) and not torch.equal(chosen[0, 0], chosen[0, 1])  # per head
    # the reference: every cached frame rotated as the dense cache rotates it, the others masked out
    cos, sin = cache._tables(9, 3, q.device)
    rotated_q, rotated_k = rotate(q, cos, sin), rotate(k, cos, sin)
    cached_k, cached_v = cache._cached(1, 1, HEADS, q.dtype, q.device)  # (B, H, 9 * 16, dim)
    read = torch.zeros(1, HEADS, 9, dtype=torch.bool).scatter_(2, chosen, True)
    mask = torch.cat([read.repeat_interleave(16, dim=2), torch.ones(1, HEADS, 3 * 16, dtype=torch.bool)], dim=2)
    reference = F.scaled_dot_product_attention(
        rotated_q, torch.cat([cached_k, rotated_k], 2), torch.cat([cached_v, v], 2), attn_mask=mask[:, :, None, :]
    )
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    # the score is the mean logit between the chunk and each frame (before the scale), as the attention sees them
    logits = rotated_q @ cached_k.transpose(-1, -2)  # (B, H, chunk tokens, 9 * 16)
    torch.testing.assert_close(scores[0], logits.unflatten(-1, (9, 16)).mean(dim=(2, 4)), rtol=1e-4, atol=1e-5)
    middle = scores[0][..., 1:8].topk(2, dim=-1).indices + 1
    assert torch.equal(chosen[..., 1:3], middle.sort(dim=-1).values)
    for handle in reversed(handles):
        handle.remove()


def _poison(stored, keep: torch.Tensor) -> None:
    """NaN in every float field of ``stored`` at the frames (B, H, frames) not in ``keep``."""
    for x in stored.tensors():
        if x is not None and x.is_floating_point():
            x[~keep] = float("nan")


@pytest.mark.parametrize("kv_format", ["native", "int8", "int4"])
def test_a_frame_not_chosen_is_never_read(monkeypatch, kv_format):
    model = tiny_wan()
    handles = [
        apply_policy(model, FullConfig()),
        apply_format(model, KVFormatConfig(format=kv_format)),
        apply_sparse(model, SparseConfig(frames=2, sink=1, recent=2)),
    ]
    cache = _filled(model, 4)  # 12 frames, 5 read
    calls = _chosen_calls(monkeypatch)
    x = seeded_randn(1, 3, 3, 8, 8, seed=9)
    clean = _forward(model, x)
    assert len(calls) == LAYERS and all(c is not None and c.shape == (1, HEADS, 5) for c in calls)
    for layer, chosen in enumerate(calls):
        keep = torch.zeros(1, HEADS, 12, dtype=torch.bool).scatter_(2, chosen, True)
        assert not keep.all(dim=-1).any()  # every head leaves frames out
        _poison(cache.keys[layer], keep)
        _poison(cache.values[layer], keep)
    poisoned = _forward(model, x)
    assert torch.isfinite(poisoned).all() and torch.equal(poisoned, clean)
    # and a poisoned frame that is read shows (the check can fail): the sink, read by every head
    for stored in (cache.keys[0], cache.values[0]):
        _poison(stored, torch.arange(12).view(1, 1, 12).expand(1, HEADS, 12) != 0)
    assert torch.isnan(_forward(model, x)).all()
    for handle in reversed(handles):
        handle.remove()


def test_each_chunk_reads_at_most_sink_recent_and_frames_of_its_cache():
    model = tiny_wan()
    acceleration = cadence.accelerate(model, "kv-full + kv-sparse(frames=2, sink=1, recent=1)")
    _latents(model, chunks=6)
    stats = acceleration.handles[-1].stats()
    acceleration.remove()
    # chunk c (1..5) sees 3c frames and reads min(3c, 4), in 3 layers x (1 step + a write pass; the last no write)
    calls = {c: LAYERS * (1 if c == 5 else 2) for c in range(1, 6)}
    assert stats["kv_sparse_frames_read"] == sum(n * min(3 * c, 4) for c, n in calls.items())
    assert stats["kv_sparse_frames_cached"] == sum(n * 3 * c for c, n in calls.items())


# -- composing ----------------------------------------------------------------------------------


def test_it_composes_with_kv_pack_and_kv_format_and_keeps_a_mean_key_per_whole_frame():
    model = tiny_wan()
    without = cadence.accelerate(model, "kv-pack(sink=1, frames=6, mid=3, ratio=2) + kv-format(format=int8)")
    plain = list(stream(model, text(), chunks=6, **CALL))
    without.remove()
    acceleration = cadence.accelerate(
        model,
        "kv-pack(sink=1, frames=6, mid=3, ratio=2) + kv-sparse(frames=1, sink=1, recent=3) + kv-format(format=int8)",
    )
    chosen = list(stream(model, text(), chunks=6, **CALL))
    share = acceleration.handles[-1].stats()["kv_sparse_read_share"]
    acceleration.remove()
    assert all(torch.isfinite(c.latents).all() for c in chosen) and 0 < share < 1
    assert [c.kept_frames for c in chosen] == [c.kept_frames for c in plain]
    # the sparse cache holds the same K/V plus one float32 mean key per kept whole frame, head and layer
    assert [c.kv_bytes - p.kv_bytes for c, p in zip(chosen, plain)] == [
        len(c.kept_frames) * LAYERS * HEADS * DIM * 4 for c in chosen
    ]
    assert torch.equal(chosen[1].latents, plain[1].latents)  # 3 whole frames cached: all read ...
    assert not torch.equal(chosen[2].latents, plain[2].latents)  # ... then 5 of 6, and it shows


def test_the_mean_keys_follow_the_kept_frames_through_evictions_and_a_prompt_switch():
    model = tiny_wan()
    acceleration = cadence.accelerate(model, "kv-sink-window(sink=1, frames=6) + kv-sparse(frames=1, sink=1, recent=2)")
    cache = getattr(model, KV_CACHE)
    generator = stream(model, text(), prompts={3: text(seed=3)}, **CALL)
    chunks = [next(generator) for _ in range(5)]  # frames evicted from chunk 2 on, all re-encoded before chunk 3
    assert chunks[3].recached_frames == [0, 3, 4, 5, 6, 7, 8] and cache.frames == [0, 9, 10, 11, 12, 13, 14]
    cos, sin = cache._tables_at([0], 4, 4, "cpu")
    for layer in range(LAYERS):
        torch.testing.assert_close(
            cache.summaries[layer], sparse_module.key_means(cache.keys[layer].data, cos, sin), rtol=0, atol=0
        )
    generator.close()
    acceleration.remove()
    assert cache.summaries == [None] * LAYERS


def test_the_stream_command_takes_it_beside_a_policy(monkeypatch, tmp_path):
    from cadence.reference.pipelines import RefVideoPipeline
    from cadence.stream import cli

    caption = "a small red square moves left over a blue gradient"
    pipes = []

    def load(name, device=None, **_):
        pipes.append(
            RefVideoPipeline(
                transformer=tiny_wan(),
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                sample_size={"frames": 4, "height": 8, "width": 8},
            )
        )
        pipes[-1].prompt_cache = {caption: (text(), torch.zeros(1, TEXT_DIM))}
        return pipes[-1]

    monkeypatch.setattr(cadence, "load", load)
    recipe = "kv-sink-window(sink=3, frames=12) + kv-sparse(frames=2, sink=3, recent=3)"
    assert cli._stream_recipe(recipe) == Recipe.parse(recipe)  # a policy named: none added
    assert cli._stream_recipe("kv-sparse") == Recipe.parse("kv-sparse + kv-sink-window(sink=3, frames=12)")
    result = CliRunner().invoke(
        cli.stream,
        [
            "--model",
            "ref-video",
            "--prompt",
            caption,
            "--seconds",
            "3",
            "--steps-per-chunk",
            "1",
            "--recipe",
            recipe,
            "--out",
            str(tmp_path / "s.gif"),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "kv-sparse(frames=2, sink=3, recent=3)" in result.output and (tmp_path / "s.gif").exists()
    assert not hasattr(pipes[0].transformer, KV_CACHE)


# -- restoring ----------------------------------------------------------------------------------


def test_remove_gives_back_the_cache_that_never_had_it_and_then_the_model():
    model, fresh = tiny_wan(), tiny_wan()
    x = seeded_randn(1, 3, 3, 8, 8, seed=6)
    before = _forward(model, x)
    processors = [block.attn1.processor for block in model.blocks]
    policy = apply_policy(model, SinkWindowConfig(sink=1, frames=3))
    sparse = apply_sparse(model, SparseConfig(frames=1, sink=1, recent=1))
    with_it = list(stream(model, text(), chunks=5, **CALL))
    sparse.remove()
    cache = getattr(model, KV_CACHE)
    assert cache.sparse_term is None and cache.summaries == [None] * LAYERS
    assert "kv_sparse_read_share" not in policy.stats()
    without = list(stream(model, text(), chunks=5, **CALL))
    never = list(stream(fresh, text(), chunks=5, policy=SinkWindowConfig(sink=1, frames=3), **CALL))
    assert all(torch.equal(a.latents, b.latents) and a.kv_bytes == b.kv_bytes for a, b in zip(without, never))
    assert not torch.equal(with_it[-1].latents, never[-1].latents)  # it did change the stream
    policy.remove()
    assert [block.attn1.processor for block in model.blocks] == processors and not hasattr(model, KV_CACHE)
    assert torch.equal(_forward(model, x), before)


def test_without_frames_cached_it_is_the_model_bit_for_bit():
    model = tiny_wan()
    x = seeded_randn(1, 3, 4, 8, 8, seed=2)
    before = _forward(model, x)
    acceleration = cadence.accelerate(model, "kv-full + kv-sparse(frames=0, sink=1, recent=0)")
    assert torch.equal(_forward(model, x), before)  # a plain pipeline call: nothing cached, nothing chosen
    acceleration.remove()


# -- refusing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: SparseConfig(frames=-1), r"kv-sparse: frames=-1 must be >= 0"),
        (lambda: SparseConfig(sink=-2), r"kv-sparse: sink=-2 must be >= 0"),
        (lambda: SparseConfig(recent=-1), r"kv-sparse: recent=-1 must be >= 0"),
        (lambda: SparseConfig(frames=1.5), r"kv-sparse: frames=1.5; valid: a whole number of frames"),
        (
            lambda: SparseConfig(frames=0, sink=0, recent=0),
            r"kv-sparse: frames=0, sink=0, recent=0 reads no cached frame .*valid: frames \+ sink \+ recent >= 1",
        ),
        (
            lambda: Recipe.parse("kv-sparse(window=3)"),
            r"unknown parameter 'window' for technique 'kv-sparse'; valid: frames, sink, recent",
        ),
    ],
)
def test_bad_knobs_are_refused_naming_the_value_and_the_valid_ones(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_second_selection_and_a_cache_filled_without_it_are_refused():
    model = tiny_wan()
    policy = apply_policy(model, FullConfig())
    sparse = apply_sparse(model, SparseConfig())
    with pytest.raises(ValueError, match=r"already chooses the frames it reads by kv-sparse; remove it first"):
        apply_sparse(model, SparseConfig(frames=1))
    sparse.remove()
    _filled(model, 1)
    with pytest.raises(ValueError, match=r"already holds frames \[0, 1, 2\].*valid: apply it before the stream"):
        apply_sparse(model, SparseConfig())
    assert getattr(model, KV_CACHE).users == 1  # the refusal left no hold behind
    policy.remove()
    assert not hasattr(model, KV_CACHE)


def test_without_a_kv_policy_it_is_refused_by_the_stream_and_by_the_cache():
    model = tiny_wan()
    acceleration = cadence.accelerate(model, "kv-sparse")
    with pytest.raises(ValueError, match=r"no KV cache policy"):
        stream(model, text(), chunks=2, **CALL)
    cache = getattr(model, KV_CACHE)
    cache.set_mode("write")
    _forward(model, seeded_randn(1, 3, 3, 8, 8))
    cache.commit()  # by hand, past the stream's check
    with pytest.raises(
        ValueError,
        match=r"kv-sparse chooses among the frames a KV cache policy keeps.*valid: a "
        r"recipe with kv-full, kv-window, kv-sink-window or kv-pack",
    ):
        _forward(model, seeded_randn(1, 3, 3, 8, 8))
    acceleration.remove()
    assert not hasattr(model, KV_CACHE)


def test_choose_keeps_the_sink_and_recent_and_the_best_between_per_head():
    scores = torch.tensor([[[9.0, 1.0, 5.0, 3.0, 4.0, 0.0], [0.0, 7.0, 1.0, 6.0, 2.0, 9.0]]])  # (1, 2, 6)
    assert sparse_module.choose(scores, 1, 1, 2).tolist() == [[[0, 2, 4, 5], [0, 1, 3, 5]]]
    assert sparse_module.choose(scores, 2, 2, 2) is None  # 2 between, 2 to choose: every frame
    assert sparse_module.choose(scores, 0, 0, 1).tolist() == [[[0], [5]]]
    assert sparse_module.choose(scores, 9, 0, 1) is None  # a sink longer than the cache is the cache
