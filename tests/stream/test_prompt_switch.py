"""Prompt switching in the streaming engine (LongLive's KV re-cache): a switch is a hand-made
re-cache bit for bit, re-caching the same prompt under kv-full rebuilds the very cache the stream
had, without re-cache the old K/V stay, a stream with no switch is unchanged, the clean latents
kept for a re-cache are bounded by the policy, the model is restored, and bad schedules are
refused before anything is generated."""

import pytest
import torch
from conftest import text, tiny_wan
from diffusers import FlowMatchEulerDiscreteScheduler

from cadence.accel.sequence import FullConfig, SinkWindowConfig, WindowConfig
from cadence.accel.sequence._base import KV_CACHE, apply_policy
from cadence.stream import stream
from cadence.stream.engine import _chunk

SIZE = {"height": 8, "width": 8}
CHUNK, STEPS, SEED = 3, 1, 5
OLD, NEW = text(seed=1), text(seed=2)


def _latents(chunks) -> list[torch.Tensor]:
    return [chunk.latents for chunk in chunks]


def _by_hand(policy, chunks: int, switch: int, runs: list[list[int]] | None) -> list[torch.Tensor]:
    """The stream written out: chunks of OLD, then before chunk ``switch`` the kept frames written
    again with NEW, ``runs`` by ``runs``, at timestep 0 (None: no re-cache), then chunks of NEW."""
    model = tiny_wan()
    handle = apply_policy(model, policy)
    cache = getattr(model, KV_CACHE)
    scheduler, generator = FlowMatchEulerDiscreteScheduler(), torch.Generator().manual_seed(SEED)
    made = []
    for index in range(chunks):
        if index == switch and runs is not None:
            video, written = torch.cat(made, dim=2), cache.written  # (B, C, frames so far, H, W)
            cache.reset()
            for run in runs:
                cache.set_mode("write")
                cache.written = run[0]
                with torch.no_grad():
                    model(
                        hidden_states=video[:, :, run[0] : run[-1] + 1],
                        timestep=torch.zeros(1),
                        encoder_hidden_states=NEW,
                        return_dict=False,
                    )
                cache.commit()
            cache.written = written
        embeds = OLD if index < switch else NEW
        made.append(_chunk(model, cache, embeds, generator, CHUNK, STEPS, (8, 8), scheduler, write=index < chunks - 1))
    handle.remove()
    return made


@pytest.mark.parametrize(
    "policy, switch, runs",
    [
        (WindowConfig(frames=6), 3, [[3, 4, 5], [6, 7, 8]]),
        (SinkWindowConfig(sink=3, frames=3), 3, [[0, 1, 2], [6, 7, 8]]),
        (SinkWindowConfig(sink=1, frames=4), 2, [[0], [2], [3, 4, 5]]),  # frame 1 evicted: chunk 0 in two runs
    ],
)
def test_a_switch_is_a_hand_made_recache_bit_for_bit(policy, switch, runs):
    chunks = list(
        stream(
            tiny_wan(),
            OLD,
            chunks=5,
            frames_per_chunk=CHUNK,
            steps_per_chunk=STEPS,
            policy=policy,
            seed=SEED,
            prompts={switch: NEW},
            **SIZE,
        )
    )
    expected = _by_hand(policy, 5, switch, runs)
    assert all(torch.equal(a, b) for a, b in zip(_latents(chunks), expected))
    assert chunks[switch].recached_frames == [frame for run in runs for frame in run]
    assert [c.recached_frames for i, c in enumerate(chunks) if i != switch] == [[]] * 4
    # the re-cached frames keep their indices, and the stream goes on as before
    plain = list(stream(tiny_wan(), OLD, chunks=5, steps_per_chunk=STEPS, policy=policy, seed=SEED, **SIZE))
    assert [c.kept_frames for c in chunks] == [c.kept_frames for c in plain]


def test_without_recache_the_old_kv_stay_and_only_the_text_changes():
    call = {"chunks": 5, "steps_per_chunk": STEPS, "policy": WindowConfig(frames=6), "seed": SEED, **SIZE}
    kept = list(stream(tiny_wan(), OLD, prompts={3: NEW}, recache=False, **call))
    assert all(torch.equal(a, b) for a, b in zip(_latents(kept), _by_hand(WindowConfig(frames=6), 5, 3, None)))
    assert all(c.recached_frames == [] for c in kept)
    recached = list(stream(tiny_wan(), OLD, prompts={3: NEW}, **call))
    assert torch.equal(kept[2].latents, recached[2].latents)  # the switch does not reach back
    assert not torch.equal(kept[3].latents, recached[3].latents)  # and re-caching changes what follows


def test_recaching_the_same_prompt_under_kv_full_rebuilds_the_same_cache():
    """kv-full keeps every frame, so re-encoding them run by run, each attending to those before
    it, repeats the stream's own write passes: the same K/V, and the same chunks after."""
    call = {"chunks": 4, "steps_per_chunk": STEPS, "policy": FullConfig(cap_frames=12), "seed": SEED, **SIZE}
    switched = list(stream(tiny_wan(), OLD, prompts={2: OLD}, **call))
    plain = list(stream(tiny_wan(), OLD, **call))
    assert switched[2].recached_frames == [0, 1, 2, 3, 4, 5]
    assert all(torch.equal(a, b) for a, b in zip(_latents(switched), _latents(plain)))
    assert [c.kv_bytes for c in switched] == [c.kv_bytes for c in plain]


def test_a_stream_with_no_switch_is_unchanged():
    call = {"chunks": 3, "steps_per_chunk": STEPS, "policy": WindowConfig(frames=3), "seed": SEED, **SIZE}
    plain = _latents(stream(tiny_wan(), OLD, **call))
    for prompts, recache in ((None, True), ({}, True), ({}, False), ({1: OLD}, False)):
        assert all(
            torch.equal(a, b)
            for a, b in zip(plain, _latents(stream(tiny_wan(), OLD, prompts=prompts, recache=recache, **call)))
        )


def test_the_latents_kept_for_a_recache_are_the_kept_frames_and_go_after_the_last_switch():
    chunks = stream(
        tiny_wan(),
        OLD,
        chunks=8,
        steps_per_chunk=1,
        policy=SinkWindowConfig(sink=3, frames=3),
        prompts={4: NEW, 6: OLD},
        **SIZE,
    )
    held = []
    for chunk in chunks:
        # the generator's own state: the clean latents it holds for a later re-cache
        held.append((sorted(chunks.gi_frame.f_locals["clean"]) if chunks.gi_frame else None, chunk.kept_frames))
    for index, (latents, kept) in enumerate(held[:-1]):
        assert latents == (kept if index < 6 else [])  # bounded as the KV is; none once no switch is ahead


def test_a_switched_stream_leaves_the_model_exactly_restored():
    model = tiny_wan()
    x = torch.randn(1, 3, 4, 8, 8, generator=torch.Generator().manual_seed(9))

    def forward():
        with torch.no_grad():
            return model(hidden_states=x, timestep=torch.tensor([300.0]), encoder_hidden_states=OLD, return_dict=False)[
                0
            ]

    before, processors = forward(), [block.attn1.processor for block in model.blocks]
    chunks = stream(model, OLD, steps_per_chunk=1, policy=WindowConfig(frames=3), prompts={1: NEW}, **SIZE)
    next(chunks), next(chunks), next(chunks)
    chunks.close()
    assert [block.attn1.processor for block in model.blocks] == processors and not hasattr(model, KV_CACHE)
    assert torch.equal(forward(), before)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"prompts": {0: NEW}}, ValueError, r"a prompt switch at chunk 0; valid: chunk indices 1\.\.3 \(chunk 0 takes"),
        ({"prompts": {4: NEW}}, ValueError, r"a prompt switch at chunk 4; valid: chunk indices 1\.\.3"),
        ({"prompts": {True: NEW}}, ValueError, r"a prompt switch at chunk True"),
        (
            {"prompts": {2: text(batch=2)}},
            ValueError,
            r"switched to at chunk 2 has embeddings of shape \(2, 5, 16\); valid: \(batch=1, tokens, text_dim=16\)",
        ),
        ({"prompts": {2: torch.zeros(5, 16)}}, ValueError, r"shape \(5, 16\); valid"),
        ({"prompts": [NEW]}, TypeError, r"prompts=list; valid: a mapping \{chunk index: prompt_embeds\}"),
        ({"recache": "yes"}, TypeError, r"recache='yes'; valid: True or False"),
    ],
)
def test_bad_schedules_are_refused_before_anything_is_generated(kwargs, error, message):
    model = tiny_wan()
    with pytest.raises(error, match=message):
        stream(model, OLD, chunks=4, policy=WindowConfig(frames=3), **SIZE, **kwargs)
    assert not hasattr(model, KV_CACHE)


def test_an_unbounded_stream_takes_a_switch_at_any_later_chunk():
    with pytest.raises(ValueError, match=r"chunk 0; valid: chunk indices 1 or later"):
        stream(tiny_wan(), OLD, prompts={0: NEW}, **SIZE)
    chunks = stream(tiny_wan(), OLD, steps_per_chunk=1, policy=WindowConfig(frames=3), prompts={2: NEW}, **SIZE)
    assert [next(chunks).recached_frames for _ in range(3)] == [[], [], [3, 4, 5]]
    chunks.close()
