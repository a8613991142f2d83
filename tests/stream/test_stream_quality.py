"""benchmarks/stream_quality.py: its windows, its goal checks and its refusals, and one tiny run end to
end (a stream that keeps every frame is kv-full bit for bit; the model is given back as it was)."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import TEXT_DIM, tiny_wan
from diffusers import FlowMatchEulerDiscreteScheduler

from cadence.accel.sequence import KVFormatConfig, SinkWindowConfig
from cadence.accel.sequence._base import KV_CACHE
from cadence.recipe import Recipe
from cadence.reference import data
from cadence.reference.pipelines import RefVideoPipeline

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import stream_quality as sq

POLICY = SinkWindowConfig(sink=4, frames=8)  # ref-stream's default


def test_windows_are_whole_and_the_partial_last_one_is_left_out():
    assert sq.window_spans(1_002, 100)[-1] == (900, 1_000)
    assert len(sq.window_spans(1_002, 100)) == 10
    assert sq.window_spans(40, 20) == [(0, 20), (20, 40)]
    assert sq.clip_spans((900, 1_000), 16) == [(900 + 16 * k, 916 + 16 * k) for k in range(6)]
    assert sq.clip_spans((0, 20), 20) == [(0, 20)]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: sq.window_spans(40, 1), r"--window 1; valid: an int >= 2"),
        (lambda: sq.window_spans(40, 50), r"--window 50 is longer than the 40-frame stream; valid: 2..40"),
        (lambda: sq.clip_spans((0, 20), 21), r"--clip-frames 21; valid: 1..20"),
        (lambda: sq.full_chunks(3, 4, 256, 250), r"--full-cap 3 is under one chunk; valid: 0 or >= 4"),
        (lambda: sq.full_chunks(-1, 4, 256, 250), r"--full-cap -1; valid: 0 .* or frames >= 4"),
        (lambda: sq.stream_chunks(0, 4), r"--frames 0; valid: an int >= 1"),
    ],
)
def test_bad_sizes_are_refused_naming_the_value_and_the_valid_ones(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_the_full_reference_stays_within_the_cap_the_rotary_table_and_the_stream():
    assert sq.stream_chunks(1_000, 4) == 250 and sq.stream_chunks(1_000, 3) == 334  # 1,002 frames
    assert sq.full_chunks(256, 4, 256, 250) == 64  # 63 cached chunks + the last one: positions 0..255
    assert sq.full_chunks(1_000, 3, 256, 334) == 85  # 255 frames: the rotary table's 256 positions bind
    assert sq.full_chunks(100, 4, 256, 10) == 10  # no longer than the stream
    assert sq.full_chunks(0, 4, 256, 250) == 0  # no reference


def _row(recipe: str, adherence: float, windows: dict | None = None) -> dict:
    spans = windows or {(0, 100): adherence, (900, 1_000): adherence}
    return {
        "recipe": recipe,
        "adherence": adherence,
        "windows": [{"start": s, "end": e, "adherence": a} for (s, e), a in spans.items()],
    }


def test_goal_checks_compare_the_goal_windows_and_int8_with_bf16_in_points():
    rows = [
        _row(str(POLICY), 0.7, {(0, 100): 0.80, (100, 200): 0.1, (900, 1_000): 0.75}),
        _row(f"kv-format(format=bf16) + {POLICY}", 0.700),  # the terms' order does not matter
        _row(f"{POLICY} + kv-format(format=int8)", 0.691),
    ]
    checks = sq.goal_checks(rows, POLICY)
    assert checks["drift"]["points"] == pytest.approx(-5.0) and checks["drift"]["met"]  # within 5: inclusive
    assert checks["int8"]["points"] == pytest.approx(-0.9) and checks["int8"]["met"]
    rows[0]["windows"][2]["adherence"] = 0.749
    rows[2]["adherence"] = 0.711
    checks = sq.goal_checks(rows, POLICY)
    assert not checks["drift"]["met"] and not checks["int8"]["met"]
    assert "NO" in sq.describe_goals(checks, POLICY)[0] and "+1.1 points" in sq.describe_goals(checks, POLICY)[1]


def test_a_goal_the_run_cannot_measure_says_why_instead_of_passing():
    short = [_row(str(POLICY), 0.5, {(0, 20): 0.5, (20, 40): 0.5}), _row(f"{POLICY} + kv-format(format=int8)", 0.5)]
    checks = sq.goal_checks(short, POLICY)
    assert checks["drift"] == {"measured": False, "why": "the run has no whole windows 0-100 and 900-1000"}
    assert not checks["int8"]["measured"] and "bf16 and int8" in checks["int8"]["why"]
    assert not sq.goal_checks([], POLICY)["drift"]["measured"]
    assert all("not measured" in line for line in sq.describe_goals(checks, POLICY))


def test_kv_bytes_are_flat_from_the_chunk_that_fills_the_window_and_never_for_a_growing_cache():
    # the last entry repeats the one before: the last chunk of a bounded stream is not written
    assert sq.kv_summary([[4, 10], [8, 20], [12, 30], [16, 30], [20, 30]]) == {
        "kv_bytes_peak": 30,
        "kv_flat_from_frame": 12,
    }
    assert sq.kv_summary([[4, 10], [8, 20], [12, 30], [16, 30]])["kv_flat_from_frame"] is None


def test_default_recipes_hold_the_goal_rows_and_keep_the_policys_positions():
    texts = sq.default_recipes(POLICY, 4)
    recipes = sq.check_recipes(texts, {"chunk_frames": 4, "frames": 16})
    assert [str(r) for r in recipes] == [str(Recipe.parse(t)) for t in texts]
    terms = [frozenset(r.techniques) for r in recipes]
    assert {frozenset([POLICY, KVFormatConfig(format=name)]) for name in ("bf16", "int8", "int4")} <= set(terms)
    policies = [term for r in recipes for term in r.techniques if hasattr(term, "max_frames")]
    assert {p.max_frames for p in policies} == {POLICY.max_frames}  # window and pack: as many positions


def test_recipes_are_refused_before_loading_naming_the_bad_one():
    with pytest.raises(ValueError, match=r"--recipes 'kv-full': kv-full is the fidelity reference"):
        sq.check_recipes(["kv-full"], None)
    with pytest.raises(ValueError, match=r"--recipes 'teacache\(budget=0.5\)': .*step-level"):
        sq.check_recipes(["teacache(budget=0.5)"], None)
    with pytest.raises(ValueError, match=r"--recipes 'kv-format\(format=int9\)'.*valid: native, bf16, int8"):
        sq.check_recipes(["kv-format(format=int9)"], None)
    # a recipe without a policy gets the model's default (a causal student's own)
    recipe = sq.check_recipes(["kv-format(format=int8)"], {"chunk_frames": 4, "frames": 16})[0]
    assert POLICY in recipe.techniques


def test_a_tiny_run_judges_every_window_and_keeping_every_frame_is_kv_full_bit_for_bit():
    from cadence.judge import checkpoint

    captions = data.heldout_prompts(2, video=True)
    pipe = RefVideoPipeline(
        transformer=tiny_wan(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        sample_size={"frames": 2, "height": 8, "width": 8},
    )
    generator = torch.Generator().manual_seed(0)
    pipe.prompt_cache = {
        c: (torch.randn(1, 4, TEXT_DIM, generator=generator), torch.randn(1, TEXT_DIM)) for c in captions
    }
    transformer = pipe.transformer
    probe = {
        "hidden_states": torch.randn(1, 3, 2, 8, 8),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 4, TEXT_DIM),
        "return_dict": False,
    }
    with torch.no_grad():
        before = transformer(**probe)[0]
    plan = sq.Plan(chunks=6, frames_per_chunk=2, steps_per_chunk=2, window=6, clip_frames=3, full_chunks=6)
    recipes = sq.check_recipes(["kv-window(frames=12)", "kv-sink-window(sink=1, frames=2)"], None)
    result = sq.run(pipe, checkpoint.load(), captions, pipe.encode_prompt(captions)[0], recipes, plan)

    everything, bounded, full = result["rows"]
    assert full["recipe"] == "kv-full(cap_frames=12)"
    assert everything["fidelity"]["n_identical"] == 2  # +inf PSNR: the same frames as kv-full
    assert bounded["fidelity"]["n_identical"] == 0 and bounded["fidelity"]["frames"] == 12
    assert bounded["kv_flat_from_frame"] == 4 and everything["kv_flat_from_frame"] is None
    for row in result["rows"]:
        assert [(w["start"], w["end"]) for w in row["windows"]] == [(0, 6), (6, 12)]
        assert all(w["clips"] == 4 and w["fd"] is not None and 0 <= w["consistency"] <= 1 for w in row["windows"])
        assert row["drift"] == pytest.approx(row["windows"][1]["adherence"] - row["windows"][0]["adherence"])
    assert result["renders"]["clips"] == 4
    assert not hasattr(transformer, KV_CACHE)
    with torch.no_grad():
        assert torch.equal(transformer(**probe)[0], before)  # every recipe removed
