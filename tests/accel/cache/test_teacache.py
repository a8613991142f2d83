import functools
import math

import numpy as np
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
from cadence.accel.cache.teacache import Rescaler, TeaCacheConfig, calibrate, fit
from cadence.context import get_context

STEPS = 8


RUN = tiny_runs(STEPS)
sample = functools.partial(tiny_sample, steps=STEPS)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """kind -> teacache calibration of the tiny model, on two seeds other than the tests'."""
    root = tmp_path_factory.mktemp("teacache")
    return {kind: calibrate(make_pipe(kind), [RUN[kind](seed=s) for s in (7, 8)], root / kind / "teacache.json")
            for kind in RUN}


def config(calibrated, kind, **params):
    return TeaCacheConfig(calibration=str(calibrated[kind]), **params)


@pytest.fixture(scope="module")
def policy(calibrated):
    return Calibrated(TeaCacheConfig, calibrated, exact={"threshold": 0.0}, reusing={"threshold": 1.0})


def test_calibration_file_holds_the_fit_and_what_it_was_made_on(calibrated, kind):
    data = calibration.load(make_pipe(kind).transformer, "teacache", str(calibrated[kind]))
    assert len(data["coefficients"]) == 5
    assert data["steps"] == STEPS and data["guidance_scale"] == 3.0
    assert data["transitions"] == 2 * 2 * (STEPS - 2)  # 2 runs x 2 CFG branches, the last transition left out
    assert data["fit_residual"] >= 0 and data["input_range"][0] <= data["input_range"][1]


def test_first_and_last_steps_always_compute(calibrated):
    """An unreachable threshold reuses every step but the first and the last, per branch."""
    pipe = make_pipe("video")
    with cadence.accelerate(pipe, config(calibrated, "video", threshold=1e9)) as acceleration:
        sample(pipe, "video", steps=10)
        assert acceleration.stats()["compute_fraction"] == pytest.approx(2 / 10)


def test_larger_threshold_computes_less(calibrated, kind):
    pipe = make_pipe(kind)
    fractions = []
    for threshold in (0.0, 0.1, 0.3, 1.0):
        with cadence.accelerate(pipe, config(calibrated, kind, threshold=threshold)) as acceleration:
            sample(pipe, kind, steps=12)
            fractions.append(acceleration.stats()["compute_fraction"])
    assert fractions == sorted(fractions, reverse=True) and fractions[0] > fractions[-1]


@pytest.mark.parametrize("budget, steps", [(0.3, 10), (0.5, STEPS), (0.6, 13)])
def test_budget_is_never_exceeded(calibrated, kind, budget, steps):
    pipe = make_pipe(kind)
    with cadence.accelerate(pipe, config(calibrated, kind, budget=budget)) as acceleration:
        sample(pipe, kind, steps=steps)
        sample(pipe, kind, steps=steps, seed=1)
        fraction = acceleration.stats()["compute_fraction"]
    assert fraction <= budget + 1e-9
    assert fraction > 0


def test_fit_recovers_a_polynomial_and_leaves_out_the_transition_into_the_last_step():
    rng = np.random.default_rng(0)
    truth = [40.0, -12.0, 3.0, 0.5, 0.01]
    recorded = []
    for _ in range(4):
        x = list(rng.uniform(0.02, 0.3, size=9))
        y = list(np.polyval(truth, x))
        y[-1] = 5.0  # the output jump into the last step, which always computes
        recorded.append(traces.Trace("cond", modulated_l1=x, output_l1=y))
    fitted = fit(recorded)
    assert fitted["transitions"] == 4 * 8
    assert np.allclose(fitted["coefficients"], truth, rtol=1e-4, atol=1e-6)
    assert fitted["fit_residual"] < 1e-6


def test_fit_refuses_too_few_transitions():
    recorded = [traces.Trace("cond", modulated_l1=[0.1, 0.2, 0.3], output_l1=[0.1, 0.2, 0.3])]
    with pytest.raises(ValueError, match="teacache: 2 step transitions.*more prompts or more steps"):
        fit(recorded)


def test_rescaled_change_is_never_negative_and_keeps_growing_past_the_calibrated_range():
    rescale = Rescaler([-50.0, 0.0, 0.0, 1.0, 0.0], x_max=0.2)  # turns down, then negative, past x = 0.2
    assert rescale(0.1) == pytest.approx(0.1 - 50 * 0.1**4)
    assert rescale(0.4) == pytest.approx(2 * rescale(0.2)) and rescale(0.4) > rescale(0.2) > 0
    assert Rescaler([-1.0, 0, 0, 0, 0], x_max=0.2)(0.1) == 0.0


def test_refuses_a_calibration_of_another_model(calibrated):
    torch.manual_seed(1)
    reseeded = make_pipe("video", transformer=type(tiny_wan()).from_config(tiny_wan().config).eval())
    for pipe in (reseeded, make_pipe("image")):
        with pytest.raises(ValueError, match="made for another model.*cadence calibrate --technique teacache"):
            cadence.accelerate(pipe, config(calibrated, "video"))
        assert get_context(pipe.transformer) is None


def test_refuses_a_missing_calibration_and_says_how_to_make_one(tmp_path):
    pipe = make_pipe("video")
    for where in ("", str(tmp_path / "nope.json")):
        with pytest.raises(ValueError, match="teacache: no calibration.*`cadence calibrate --model MODEL --technique "
                                             "teacache`"):
            cadence.accelerate(pipe, TeaCacheConfig(calibration=where))


def test_refuses_a_calibration_of_another_technique(calibrated, tmp_path):
    pipe = make_pipe("video")
    other = calibration.save(pipe.transformer, "magcache", {"ratios": {"cond": [1.0]}, "steps": 2}, tmp_path / "m.json")
    with pytest.raises(ValueError, match="calibration for 'magcache', not 'teacache'"):
        cadence.accelerate(pipe, TeaCacheConfig(calibration=str(other)))


@pytest.mark.parametrize("params", [dict(threshold=-0.1), dict(threshold=math.nan), dict(warmup=-1), dict(budget=2.0)])
def test_refuses_bad_parameters(params):
    with pytest.raises(ValueError, match="teacache"):
        TeaCacheConfig(**params)


@pytest.mark.parametrize("model", ["ref-video", "ref-image"])
def test_shipped_calibration_runs_on_the_reference_model(model):
    """The packaged calibration (default path) loads for the trained model and a short
    generation reuses steps with it. Fidelity on real prompts: see the benchmarks."""
    pipe = cadence.load(model, text_encoder=False)
    pipe.set_progress_bar_config(disable=True)
    data = calibration.load(pipe.transformer, "teacache")
    assert data["steps"] == 20 and data["guidance_scale"] == 4.0 and len(data["prompts"]) == 8
    tokens = torch.randn(1, 24, 384, generator=torch.Generator().manual_seed(0))
    run = dict(prompt_embeds=tokens, negative_prompt_embeds=torch.zeros_like(tokens), steps=10)
    if model == "ref-video":
        run["frames"] = 2
    else:
        run.update(pooled_prompt_embeds=tokens.mean(1), negative_pooled_prompt_embeds=torch.zeros(1, 384))
    baseline = pipe(**run)[0]
    with cadence.accelerate(pipe, TeaCacheConfig(threshold=0.3)) as acceleration:
        accelerated = pipe(**run)[0]
        assert 0 < acceleration.stats()["compute_fraction"] < 1
    assert accelerated.shape == baseline.shape and torch.isfinite(accelerated).all()
    assert not torch.equal(accelerated, baseline)
