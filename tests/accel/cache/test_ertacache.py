import functools
import json
import math

import pytest
import torch
from accel.cache.calibrated_contract import (  # noqa: F401 - collected here
    Calibrated,
    test_remove_restores_bit_identical_outputs,
    test_threshold_zero_is_bit_identical,
)
from conftest import tiny_pipe as make_pipe
from conftest import tiny_runs, tiny_sample

import cadence
from cadence.accel import calibration
from cadence.accel.cache.ertacache import ERTACacheConfig, calibrate, describe_calibration, fit_affine, resample
from cadence.reference.data import heldout_prompts

STEPS = 8  # calibrated; tests run on these steps unless they test resampling


RUN = tiny_runs(STEPS)
sample = functools.partial(tiny_sample, steps=STEPS)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """kind -> calibration file of the tiny model, made on the prompt the tests run, seeds 0-2."""
    root = tmp_path_factory.mktemp("ertacache")
    runs = {kind: [RUN[kind](seed=seed) for seed in range(3)] for kind in RUN}
    return {kind: calibrate(make_pipe(kind), runs[kind], root / kind / "ertacache.json") for kind in RUN}


def config(calibrated, kind, **params):
    return ERTACacheConfig(calibration=str(calibrated[kind]), **params)


@pytest.fixture(scope="module")
def policy(calibrated):
    return Calibrated(ERTACacheConfig, calibrated, exact={"threshold": 0.0}, reusing={"threshold": 0.5})


def test_calibration_is_small_and_beside_its_maps(calibrated, kind):
    path = calibrated[kind]
    maps = path.with_suffix(".safetensors")
    assert maps.is_file()
    assert path.stat().st_size + maps.stat().st_size < 200_000


def errors_at_one_schedule(calibrated, kind, threshold, **run):
    """-> {(rectify, adjust_timesteps): relative error against full compute}; the schedule
    is static, so all four share it (asserted)."""
    pipe = make_pipe(kind)
    baseline = sample(pipe, kind, **run)
    errors, fractions = {}, set()
    for rectify in (False, True):
        for adjust in (False, True):
            params = dict(threshold=threshold, rectify=rectify, adjust_timesteps=adjust)
            with cadence.accelerate(pipe, config(calibrated, kind, **params)) as acceleration:
                accelerated = sample(pipe, kind, **run)
                fractions.add(acceleration.stats()["compute_fraction"])
            errors[rectify, adjust] = float((accelerated - baseline).norm() / baseline.norm())
    assert len(fractions) == 1 and 0 < fractions.pop() < 1
    return errors


@pytest.mark.parametrize("seed", [0, 7])
def test_corrections_lower_the_error_of_plain_reuse_on_the_calibration_prompt(calibrated, kind, seed):
    """The method's claim, checked where a tiny random model can show it: on the prompt it
    was calibrated on, from a calibrated seed (0) and a held-out one (7). A random model's
    residuals share no structure across prompts for the maps to learn."""
    errors = errors_at_one_schedule(calibrated, kind, threshold=0.5, seed=seed)
    plain = errors[False, False]
    assert 0 < errors[True, False] < plain
    assert errors[True, True] < plain
    assert errors[False, True] != plain  # the output scale acts on reused steps


def test_schedule_is_static(calibrated, kind):
    """(a): which steps compute is fixed by the profile, whatever the seed or guidance."""
    pipe = make_pipe(kind)
    schedules = []
    with cadence.accelerate(pipe, config(calibrated, kind, threshold=0.4)) as acceleration:
        for seed in (0, 5):
            sample(pipe, kind, seed=seed)
            schedules.append(acceleration.stats()["schedule"])
    assert schedules[0] == schedules[1]
    assert schedules[0]["cond"] == schedules[0]["uncond"]
    assert 0 < sum(schedules[0]["cond"]) < STEPS


def test_runs_on_another_number_of_steps_by_resampling(calibrated, kind):
    pipe = make_pipe(kind)
    baseline = sample(pipe, kind, steps=13)
    with cadence.accelerate(pipe, config(calibrated, kind, threshold=0.5)) as acceleration:
        accelerated = sample(pipe, kind, steps=13)
        assert 0 < acceleration.stats()["compute_fraction"] < 1
    assert float((accelerated - baseline).norm() / baseline.norm()) < 0.25


@pytest.mark.parametrize("budget,steps", [(0.4, STEPS), (0.6, STEPS), (0.5, 5)])
def test_budget_is_never_exceeded(calibrated, kind, budget, steps):
    pipe = make_pipe(kind)
    with cadence.accelerate(pipe, config(calibrated, kind, budget=budget)) as acceleration:
        sample(pipe, kind, steps=steps)
        sample(pipe, kind, steps=steps, seed=1)
        fraction = acceleration.stats()["compute_fraction"]
    assert fraction <= budget + 1e-9
    assert fraction < 1


def test_cfg_reuse_combines_with_the_output_scale(calibrated):
    pipe = make_pipe("video")
    baseline = sample(pipe, "video")
    with cadence.accelerate(pipe, config(calibrated, "video", threshold=0.5, cfg_reuse=True)) as acceleration:
        accelerated = sample(pipe, "video")
        assert acceleration.stats()["compute_fraction"] < 1
    assert float((accelerated - baseline).norm() / baseline.norm()) < 0.25


def test_refuses_a_calibration_of_another_model(calibrated):
    with pytest.raises(ValueError, match="another model"):
        cadence.accelerate(make_pipe("image"), config(calibrated, "video"))
    pipe = make_pipe("video")
    with torch.no_grad():
        next(pipe.transformer.parameters()).flatten()[0] += 1.0
    with pytest.raises(ValueError, match="another model"):
        cadence.accelerate(pipe, config(calibrated, "video"))


def test_refuses_maps_that_do_not_belong_to_the_calibration(calibrated, tmp_path):
    source = calibrated["video"]
    copy = tmp_path / "ertacache.json"
    copy.write_text(source.read_text())
    pipe = make_pipe("video")
    with pytest.raises(ValueError, match="missing"):
        cadence.accelerate(pipe, ERTACacheConfig(calibration=str(copy)))
    cadence.accelerate(pipe, ERTACacheConfig(calibration=str(copy), rectify=False)).remove()  # the maps are not needed
    maps = bytearray(source.with_suffix(".safetensors").read_bytes())
    maps[-1] ^= 1
    copy.with_suffix(".safetensors").write_bytes(bytes(maps))
    with pytest.raises(ValueError, match="does not belong"):
        cadence.accelerate(pipe, ERTACacheConfig(calibration=str(copy)))


def test_refuses_a_max_age_beyond_the_calibrated_one(calibrated):
    with pytest.raises(ValueError, match="max_age"):
        cadence.accelerate(make_pipe("video"), config(calibrated, "video", max_age=5))


@pytest.mark.parametrize("params", [dict(threshold=-0.1), dict(threshold=math.nan), dict(threshold=math.inf),
                                    dict(max_age=0), dict(budget=1.5), dict(warmup=-1)])
def test_refuses_bad_parameters(params):
    with pytest.raises(ValueError, match="ertacache"):
        ERTACacheConfig(**params)


def test_fit_affine_recovers_a_per_channel_map_and_shrinks_toward_plain_reuse():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 3, generator=generator)
    a, b = torch.tensor([0.5, 1.0, 2.0]), torch.tensor([0.3, 0.0, -1.0])
    y = a * x + b + 0.01 * torch.randn(4000, 3, generator=generator)
    fitted_a, fitted_b = fit_affine(x, y, ridge=1e-6)
    assert torch.allclose(fitted_a, a, atol=0.01) and torch.allclose(fitted_b, b, atol=0.01)
    shrunk_a, shrunk_b = fit_affine(x, y, ridge=1e6)
    assert torch.allclose(shrunk_a, torch.ones(3), atol=1e-3) and torch.allclose(shrunk_b, torch.zeros(3), atol=1e-3)
    zero_a, zero_b = fit_affine(torch.zeros(10, 2), torch.randn(10, 2, generator=generator), ridge=0.1)
    assert torch.equal(zero_a, torch.ones(2)) and torch.equal(zero_b, torch.zeros(2))


def test_calibration_reports_progress_per_generation_and_describes_itself(tmp_path):
    class Bar:
        total, updates = 1, 0

        def refresh(self):
            pass

        def update(self):
            self.updates += 1

    bar = Bar()
    path = calibrate(make_pipe("video"), [RUN["video"](steps=3), RUN["video"](steps=3, seed=1)], tmp_path / "e.json",
                     progress=bar)
    assert bar.total == bar.updates == 4  # two passes over two runs
    assert "over 3 steps" in describe_calibration(json.loads(path.read_text()))


@pytest.mark.parametrize("model", ["ref-video", "ref-image"])
def test_shipped_calibration_runs_on_the_reference_model(model):
    """The packaged calibration loads (identity, digest, map width) and reuses. The bound
    only catches a diverged run: at this small size reuse itself costs 0.14 (image) and
    0.55 (video) relative error, and random embeddings (out of the models' distribution)
    make even plain reuse diverge."""
    pipe = cadence.load(model)
    pipe.set_progress_bar_config(disable=True)
    data = calibration.load(pipe.transformer, "ertacache")
    assert data["steps"] == 20 and len(data["prompts"]) == 8
    run = dict(prompt=heldout_prompts(1, video=model == "ref-video")[0], steps=20, height=16, width=16)
    if model == "ref-video":
        run["frames"] = 4
    baseline = pipe(**run)[0]
    with cadence.accelerate(pipe, ERTACacheConfig()) as acceleration:
        accelerated = pipe(**run)[0]
        assert acceleration.stats()["compute_fraction"] < 1
    assert float((accelerated - baseline).norm() / baseline.norm()) < 0.75


def test_resampling_the_profile_keeps_its_total_change():
    """At half the steps each step covers two calibrated ones and changes as much as both."""
    profile = [0.6, 0.2, 0.1, 0.1, 0.1, 0.1, 0.2, 0.3]  # 9 steps
    assert resample(profile, 9) == profile
    assert resample(profile, 5) == pytest.approx([0.8, 0.2, 0.2, 0.5])
    assert sum(resample(profile, 17)) == pytest.approx(sum(profile))
    assert resample(profile, 17)[:2] == pytest.approx([0.3, 0.3])
