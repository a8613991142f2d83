import functools
import math

import pytest
import torch
from accel.cache.calibrated_contract import (  # noqa: F401 - collected here
    Calibrated,
    test_positive_threshold_reuses_steps_within_an_error_bound,
    test_remove_restores_bit_identical_outputs,
    test_threshold_zero_is_bit_identical,
)
from conftest import tiny_pipe as make_pipe
from conftest import tiny_runs, tiny_sample, tiny_wan

import cadence
from cadence.accel import calibration
from cadence.accel.cache import traces
from cadence.accel.cache.magcache import MagCacheConfig, calibrate, fit
from cadence.context import get_context

STEPS = 8


RUN = tiny_runs(STEPS)
sample = functools.partial(tiny_sample, steps=STEPS)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """kind -> magcache calibration of the tiny model, on two seeds other than the tests'."""
    root = tmp_path_factory.mktemp("magcache")
    return {kind: calibrate(make_pipe(kind), [RUN[kind](seed=s) for s in (7, 8)], root / kind / "magcache.json")
            for kind in RUN}


def config(calibrated, kind, **params):
    return MagCacheConfig(calibration=str(calibrated[kind]), **params)


@pytest.fixture(scope="module")
def policy(calibrated):
    return Calibrated(MagCacheConfig, calibrated, exact={"threshold": 0.0, "retention_ratio": 0.0}, reusing={"threshold": 1.0})


def curve_file(tmp_path, kind, cond, uncond=None):
    """A calibration of the tiny model with a given curve (gamma into steps 1..N-1)."""
    ratios = {"cond": cond, **({"uncond": uncond} if uncond else {})}
    transformer = make_pipe(kind).transformer
    return str(calibration.save(transformer, "magcache", {"ratios": ratios, "steps": len(cond) + 1},
                                tmp_path / "magcache.json"))


def test_calibration_file_holds_one_curve_per_branch(calibrated, kind):
    data = calibration.load(make_pipe(kind).transformer, "magcache", str(calibrated[kind]))
    assert data["steps"] == STEPS and data["guidance_scale"] == 3.0
    assert set(data["ratios"]) == {"cond", "uncond"}
    assert all(len(curve) == STEPS - 1 and all(r > 0 for r in curve) for curve in data["ratios"].values())


@pytest.mark.parametrize("threshold, computed", [(0.25, [0, 2, 4, 6, 8]), (0.5, [0, 3, 6, 9]), (0.05, list(range(10)))])
def test_computes_where_the_curve_accumulates_the_threshold(tmp_path, threshold, computed):
    """gamma = 0.9 on every step: reusing for k steps errs 0.1, 0.1 + 0.19, 0.1 + 0.19 + 0.271, ..."""
    pipe = make_pipe("video")
    path = curve_file(tmp_path, "video", [0.9] * 9)
    with cadence.accelerate(pipe, MagCacheConfig(threshold=threshold, retention_ratio=0.0, calibration=path)) as acc:
        sample(pipe, "video", steps=10, guidance_scale=1.0)
        assert acc.stats()["compute_fraction"] == pytest.approx(len(computed) / 10)


@pytest.mark.parametrize("max_skip, retention_ratio, fraction", [(2, 0.0, 4 / 10), (3, 0.5, 6 / 10), (1, 0.0, 5 / 10)])
def test_max_skip_and_retention_force_computes(tmp_path, max_skip, retention_ratio, fraction):
    """A flat curve (gamma = 1) never accumulates error: only the hard limits compute.
    max_skip=2: steps 0, 3, 6, 9; retention 0.5 and max_skip=3: steps 0-4 and 8."""
    pipe = make_pipe("video")
    path = curve_file(tmp_path, "video", [1.0] * 9)
    params = dict(threshold=0.1, max_skip=max_skip, retention_ratio=retention_ratio, calibration=path)
    with cadence.accelerate(pipe, MagCacheConfig(**params)) as acceleration:
        sample(pipe, "video", steps=10, guidance_scale=1.0)
        assert acceleration.stats()["compute_fraction"] == pytest.approx(fraction)


def test_each_cfg_branch_follows_its_own_curve(tmp_path):
    """A flat cond curve and a steep uncond one: the uncond branch computes every step."""
    pipe = make_pipe("video")
    path = curve_file(tmp_path, "video", cond=[1.0] * 9, uncond=[0.5] * 9)
    with cadence.accelerate(pipe, MagCacheConfig(threshold=0.1, retention_ratio=0.0, calibration=path)) as acc:
        sample(pipe, "video", steps=10)
        assert acc.stats()["compute_fraction"] == pytest.approx((3 + 10) / 20)  # cond: 0, 4, 8 (max_skip 3)


def test_uncond_falls_back_to_the_cond_curve(tmp_path):
    pipe = make_pipe("video")
    path = curve_file(tmp_path, "video", cond=[0.9] * 9)
    with cadence.accelerate(pipe, MagCacheConfig(threshold=0.25, retention_ratio=0.0, calibration=path)) as acc:
        sample(pipe, "video", steps=10)
        assert acc.stats()["compute_fraction"] == pytest.approx(0.5)


@pytest.mark.parametrize("budget, steps", [(0.2, 10), (0.5, STEPS), (0.6, 13)])
def test_budget_is_never_exceeded(calibrated, kind, budget, steps):
    pipe = make_pipe(kind)
    with cadence.accelerate(pipe, config(calibrated, kind, budget=budget)) as acceleration:
        sample(pipe, kind, steps=steps)
        sample(pipe, kind, steps=steps, seed=1)
        fraction = acceleration.stats()["compute_fraction"]
    assert fraction <= budget + 1e-9
    assert fraction > 0


def test_budget_mode_spends_its_first_slots_on_the_retained_steps(tmp_path):
    """With a flat curve the pacer alone would space the computes evenly; the retained
    first steps (up to half the budget) come first."""
    pipe = make_pipe("video")
    path = curve_file(tmp_path, "video", [0.95] * 19)
    computed = []  # steps on which the first block ran
    block = pipe.transformer.blocks[0]
    hook = block.ffn.register_forward_hook(lambda *_: computed.append(get_context(pipe.transformer).step_index))
    with cadence.accelerate(pipe, MagCacheConfig(budget=0.5, retention_ratio=0.2, calibration=path)) as acc:
        sample(pipe, "video", steps=20, guidance_scale=1.0)
        assert acc.stats()["compute_fraction"] <= 0.5 + 1e-9
    hook.remove()
    assert computed[:4] == [0, 1, 2, 3]
    assert 6 <= len(computed) <= 10


def test_fit_averages_each_branch():
    recorded = [traces.Trace("cond", magnitude_ratio=[0.9, 1.0]),
                traces.Trace("cond", magnitude_ratio=[1.1, 0.8]),
                traces.Trace("uncond", magnitude_ratio=[0.5, 0.5])]
    fitted = fit(recorded)
    assert fitted["steps"] == 3
    assert fitted["ratios"]["cond"] == pytest.approx([1.0, 0.9])
    assert fitted["ratios"]["uncond"] == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError, match="magcache: no step transitions"):
        fit([traces.Trace("cond")])


def test_refuses_a_calibration_of_another_model(calibrated):
    torch.manual_seed(1)
    reseeded = make_pipe("video", transformer=type(tiny_wan()).from_config(tiny_wan().config).eval())
    for pipe in (reseeded, make_pipe("image")):
        with pytest.raises(ValueError, match="made for another model.*cadence calibrate --technique magcache"):
            cadence.accelerate(pipe, config(calibrated, "video"))
        assert get_context(pipe.transformer) is None


def test_refuses_a_missing_calibration_and_says_how_to_make_one(tmp_path):
    pipe = make_pipe("video")
    for where in ("", str(tmp_path / "nope.json")):
        with pytest.raises(ValueError, match="magcache: no calibration.*`cadence calibrate --model MODEL --technique "
                                             "magcache`"):
            cadence.accelerate(pipe, MagCacheConfig(calibration=where))


@pytest.mark.parametrize("params, message", [
    (dict(threshold=-1.0), "threshold=-1.0 must be >= 0"),
    (dict(threshold=math.nan), "threshold=nan must be >= 0"),
    (dict(max_skip=0), "max_skip=0 must be >= 1"),
    (dict(retention_ratio=1.0), r"retention_ratio=1.0 must be in \[0, 1\)"),
    (dict(retention_ratio=-0.1), r"retention_ratio=-0.1 must be in \[0, 1\)"),
])
def test_refuses_bad_parameters(params, message):
    with pytest.raises(ValueError, match=f"magcache: {message}"):
        MagCacheConfig(**params)


@pytest.mark.parametrize("model", ["ref-video", "ref-image"])
def test_shipped_calibration_runs_on_the_reference_model(model):
    """The packaged calibration (default path) loads for the trained model and a short
    generation reuses steps with it. Fidelity on real prompts: see the benchmarks."""
    pipe = cadence.load(model, text_encoder=False)
    pipe.set_progress_bar_config(disable=True)
    data = calibration.load(pipe.transformer, "magcache")
    assert data["steps"] == 20 and data["guidance_scale"] == 4.0 and len(data["prompts"]) == 8
    assert set(data["ratios"]) == {"cond", "uncond"}
    tokens = torch.randn(1, 24, 384, generator=torch.Generator().manual_seed(0))
    run = dict(prompt_embeds=tokens, negative_prompt_embeds=torch.zeros_like(tokens), steps=10)
    if model == "ref-video":
        run["frames"] = 2
    else:
        run.update(pooled_prompt_embeds=tokens.mean(1), negative_pooled_prompt_embeds=torch.zeros(1, 384))
    baseline = pipe(**run)[0]
    with cadence.accelerate(pipe, MagCacheConfig()) as acceleration:
        accelerated = pipe(**run)[0]
        assert 0 < acceleration.stats()["compute_fraction"] < 1
    assert accelerated.shape == baseline.shape and torch.isfinite(accelerated).all()
    assert not torch.equal(accelerated, baseline)
