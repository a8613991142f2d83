"""Parallel generation on two gloo processes on the CPU equals the one-process generation,
for every technique family; remove() gives back the one-process model; the combinations
that cannot be sound are refused with the valid ones named."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_wan
from parallel.parallel_scenarios import SCENARIOS, run_both

from cadence.models import TokenLayout
from cadence.parallel import ParallelConfig
from cadence.parallel.apply import check_techniques
from cadence.parallel.sequence import arrival_order, check_layout, check_sequence
from cadence.recipe import Recipe

# Exactly equal, measured: on the CPU each rank's per-token linears, and each head's
# attention over the whole sequence, give the same floats as one process; only the order
# of tokens between ranks changes. A tolerance would hide a token put in the wrong place.
TOLERANCE = 0.0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)  # the two ranks and this process share the machine's cores
    return run_both(str(tmp_path_factory.mktemp("parallel")), tuple(s.name for s in SCENARIOS))


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_parallel_output_equals_one_process(runs, scenario):
    ranks, singles = runs
    assert "error" not in ranks[0] and "error" not in ranks[1], ranks[0].get("error") or ranks[1].get("error")
    expected = singles[scenario.name]
    for rank in ranks:
        got = rank[scenario.name]
        difference = (got["output"] - expected["output"]).abs().max().item()
        assert difference <= TOLERANCE, f"{scenario.name}: max |parallel - one process| = {difference}"
    baseline = singles[f"baseline-{scenario.model}"]["output"]
    if scenario.recipe != "fp8" and not scenario.recipe.startswith("first-blocks"):
        # the technique acted (FP8 and first-blocks change outputs too, but are checked below)
        assert not torch.equal(expected["output"], baseline), f"{scenario.recipe} left the output unchanged"


def test_step_policies_decide_the_same_steps_on_every_rank(runs):
    ranks, singles = runs
    for name in ("first-blocks-ulysses", "default-ulysses"):
        schedules = [rank[name]["stats"]["schedule"] for rank in ranks]
        assert schedules[0] == schedules[1] == singles[name]["stats"]["schedule"]
        assert 0 in schedules[0]["cond"], f"{name}: no step reused, the test would not see a disagreement"
    # cfg=2: each half runs one branch, deciding as one process decides for that branch
    cond, uncond = (rank["fixed-interval-cfg"]["stats"]["schedule"] for rank in ranks)
    assert {**cond, **uncond} == singles["fixed-interval-cfg"]["stats"]["schedule"]


def test_sparse_pattern_ran_sparse_on_each_rank(runs):
    ranks, _ = runs
    for name in ("window-ulysses", "window-image-ulysses"):
        for rank in ranks:
            stats = rank[name]["stats"]
            assert stats["sparse_calls"] > 0 and stats["density"] < 1, stats


def test_remove_gives_back_the_one_process_model(runs):
    ranks, singles = runs
    for model in ("ref-video", "ref-image"):
        for rank in ranks:
            assert torch.equal(rank[f"removed-{model}"]["output"], singles[f"baseline-{model}"]["output"])


@pytest.mark.parametrize("agreed, computed", [(0.0, [1, 0, 0, 0]), (float("inf"), [1, 1, 1, 1])])
def test_step_engine_decides_on_the_agreed_distance(video_pipe, agreed, computed):
    from conftest import video_run

    import cadence
    from cadence.accel.cache._base import AGREE

    pipe = video_pipe
    setattr(pipe.transformer, AGREE, lambda distance: agreed)  # what the ranks agreed on, whatever this one saw
    with cadence.accelerate(pipe, "first-blocks(threshold=0.5)") as acceleration:
        pipe(**video_run(steps=4))
        assert acceleration.stats()["schedule"]["cond"] == computed
    delattr(pipe.transformer, AGREE)


def test_arrival_order_puts_interleaved_slices_back_in_layout_order():
    layout = TokenLayout(1, 4, 4, text=6, text_first=True)
    tokens = torch.arange(layout.tokens)  # in layout order: [text 0..5, video 6..21]
    text, video = tokens[:6], tokens[6:]
    arrived = torch.cat([torch.cat([t, v]) for t, v in zip(text.chunk(2), video.chunk(2))])  # what the all-to-all gives
    assert torch.equal(arrival_order(layout, 2), arrived)
    assert arrival_order(TokenLayout(2, 4, 4), 2) is None  # video alone arrives in order


def test_parallel_config_validates_and_parses():
    assert ParallelConfig.parse("ulysses=2, cfg=2") == ParallelConfig(ulysses=2, cfg=2)
    assert ParallelConfig(ulysses=2, ring=2, cfg=2).world == 8
    with pytest.raises(ValueError, match="cfg=3 must be 1 or 2"):
        ParallelConfig(cfg=3)
    with pytest.raises(ValueError, match="ulysses, ring, cfg"):
        ParallelConfig.parse("heads=2")


@pytest.mark.parametrize("recipe, parallel, message", [
    ("block-delta(threshold=0.1)", "ulysses=2", "block-delta decides per block"),
    ("diffusers-fbcache", "ulysses=2", "diffusers' hooks"),
    ("sparse-window", "ring=2", "no rank holds under ring attention"),
    ("fixed-interval(cfg_reuse=true)", "cfg=2", "cfg_reuse"),
])
def test_unsound_combinations_are_refused(recipe, parallel, message):
    with pytest.raises(ValueError, match=message):
        check_techniques(ParallelConfig.parse(parallel), Recipe.parse(recipe).techniques)


def test_block_delta_alone_under_cfg_parallel_is_accepted():
    check_techniques(ParallelConfig(cfg=2), Recipe.parse("block-delta(threshold=0.1)").techniques)


def test_sequence_checks_name_the_valid_values():
    model = tiny_wan()  # 2 heads
    with pytest.raises(ValueError, match=r"valid ulysses degrees: \[1, 2\]"):
        check_sequence(model, ParallelConfig(ulysses=4), torch.device("cpu"))
    with pytest.raises(ValueError, match="on cpu use ulysses"):
        check_sequence(model, ParallelConfig(ring=2), torch.device("cpu"))
    with pytest.raises(ValueError, match="multiple of 2"):
        check_layout(TokenLayout(1, 3, 3), ParallelConfig(ulysses=2))


@pytest.mark.parametrize("value, message", [
    ("ulysses=2", "started by torchrun"),
    ("heads=2", "name one of ulysses, ring, cfg"),
])
def test_generate_parallel_outside_torchrun_or_misspelled_is_refused(monkeypatch, tmp_path, value, message):
    from click.testing import CliRunner

    from cadence.cli import main

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(main, ["generate", "--prompt", "a red square", "--device", "cpu", "--parallel", value,
                                       "--out", str(tmp_path / "clip.gif")])
    assert result.exit_code != 0 and message in result.output, result.output
