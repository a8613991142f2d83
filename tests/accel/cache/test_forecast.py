"""MagCache's ``forecast`` knob: MagCache's schedule, the residual of a reused step
forecast by Newton's divided differences through the last computed ones."""

import functools

import pytest
import torch
from conftest import tiny_pipe as make_pipe
from conftest import tiny_sample

import cadence
from cadence.accel import calibration
from cadence.accel.cache._base import Policy, Probe, install
from cadence.accel.cache.magcache import MagCache, MagCacheConfig
from cadence.context import StepContext, get_context
from cadence.recipe import Recipe

STEPS = 10
sample = functools.partial(tiny_sample, steps=STEPS)


def curve_file(tmp_path, kind):
    """gamma = 0.9 into every step: at threshold 0.25 the cond branch computes every 2nd step."""
    transformer = make_pipe(kind).transformer
    return str(
        calibration.save(
            transformer,
            "magcache",
            {"ratios": {"cond": [0.9] * (STEPS - 1)}, "steps": STEPS},
            tmp_path / kind / "magcache.json",
        )
    )


def reusing(path, **params):
    return MagCacheConfig(threshold=0.25, retention_ratio=0.0, calibration=path, **params)


class _PlainReuse(MagCache):
    """MagCache as it was before the knob: the engine's plain reuse of the last residual."""

    new_state = Policy.new_state
    computed = Policy.computed
    reuse = Policy.reuse


def test_forecast_zero_is_bit_identical_to_plain_reuse(tmp_path, kind):
    path = curve_file(tmp_path, kind)
    pipe = make_pipe(kind)
    config = reusing(path, forecast=0)
    handle = install(
        pipe.transformer, _PlainReuse(config, calibration.load(pipe.transformer, "magcache", path)["ratios"])
    )
    before = sample(pipe, kind)
    handle.remove()
    with cadence.accelerate(pipe, config) as acceleration:
        after = sample(pipe, kind)
        assert 0 < acceleration.stats()["compute_fraction"] < 1
    assert torch.equal(before, after)


@pytest.mark.parametrize("order", [1, 2])
def test_forecast_keeps_the_schedule_and_changes_the_reused_steps(tmp_path, kind, order):
    path = curve_file(tmp_path, kind)
    pipe = make_pipe(kind)
    outputs, schedules = {}, {}
    for forecast in (0, order):
        with cadence.accelerate(pipe, reusing(path, forecast=forecast, budget=0.5)) as acceleration:
            outputs[forecast] = sample(pipe, kind)
            schedules[forecast] = acceleration.stats()["schedule"]
            assert acceleration.stats()["compute_fraction"] <= 0.5 + 1e-9
    assert schedules[0] == schedules[order]
    assert not torch.equal(outputs[0], outputs[order])


@pytest.mark.parametrize("order", [1, 2])
def test_threshold_zero_with_forecast_is_bit_identical(tmp_path, kind, order):
    """Every step computed: nothing is forecast, the output is the uncached model's."""
    path = curve_file(tmp_path, kind)
    pipe = make_pipe(kind)
    baseline = sample(pipe, kind)
    config = MagCacheConfig(threshold=0.0, retention_ratio=0.0, calibration=path, forecast=order)
    with cadence.accelerate(pipe, config) as acceleration:
        accelerated = sample(pipe, kind)
        assert acceleration.stats()["compute_fraction"] == 1.0
    assert torch.equal(baseline, accelerated)


def test_remove_restores_bit_identical_outputs(tmp_path, kind):
    path = curve_file(tmp_path, kind)
    pipe = make_pipe(kind)
    baseline = sample(pipe, kind)
    acceleration = cadence.accelerate(pipe, reusing(path, forecast=1))
    accelerated = sample(pipe, kind)
    acceleration.remove()
    assert not torch.equal(baseline, accelerated)
    assert torch.equal(baseline, sample(pipe, kind))
    assert get_context(pipe.transformer) is None


@pytest.mark.parametrize("value", [3, -1])
def test_bad_forecast_is_refused_naming_the_valid_values(value):
    with pytest.raises(ValueError, match=rf"magcache: forecast={value}; valid: 0, 1, 2"):
        MagCacheConfig(forecast=value)
    with pytest.raises(ValueError, match=rf"forecast={value}; valid: 0, 1, 2"):
        Recipe.parse(f"magcache(forecast={value})")


def _policy_call(order: int, computed: dict[int, torch.Tensor], step: int) -> torch.Tensor:
    """The residual the policy gives at ``step`` after the computed steps {step: residual}."""
    policy = MagCache(MagCacheConfig(forecast=order), {"cond": [1.0]})
    state = policy.new_state()
    shape = next(iter(computed.values())).shape
    for computed_step, residual in computed.items():
        context = StepContext(step_index=computed_step, num_steps=20)
        policy.computed(state, Probe(context, torch.zeros(shape), torch.zeros(shape), lambda: None), residual, None)
    context = StepContext(step_index=step, num_steps=20)
    last = computed[max(computed)]
    probe = Probe(context, torch.zeros(shape), torch.zeros(shape), lambda: None)
    hidden, encoder = policy.reuse(state, probe, last, None, step - max(computed))
    assert encoder is None
    return hidden


def test_forecast_is_exact_on_a_residual_polynomial_in_the_step():
    """Order 1 on a residual linear in the step, order 2 on a quadratic one, at unevenly
    spaced computed steps (as MagCache's schedule places them), within the horizon."""
    generator = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(2, 6, 4, generator=generator) for _ in range(3))
    linear = {t: a + b * t for t in (0, 2, 5)}  # order 1 keeps (2, 5): horizon up to step 8
    for step in (6, 8):
        torch.testing.assert_close(_policy_call(1, linear, step), a + b * step, rtol=1e-5, atol=1e-4)
    quadratic = {t: a + b * t + c * t * t for t in (1, 4, 6)}  # horizon up to step 11
    torch.testing.assert_close(_policy_call(2, quadratic, 9), a + b * 9 + c * 81, rtol=1e-5, atol=1e-4)
    # order 1 on the quadratic: only its last two points, so not exact
    assert not torch.allclose(_policy_call(1, quadratic, 9), a + b * 9 + c * 81)


def test_forecast_holds_its_value_beyond_the_span_of_its_points():
    """Past the last computed step by more than the points span, the forecast stays at the
    value it reaches there: a slope measured over one step is not carried over four."""
    generator = torch.Generator().manual_seed(1)
    a, b = (torch.randn(2, 6, 4, generator=generator) for _ in range(2))
    linear = {t: a + b * t for t in (4, 5)}
    for step in (7, 9):
        torch.testing.assert_close(_policy_call(1, linear, step), a + b * 6, rtol=1e-5, atol=1e-4)


def test_forecast_with_one_computed_step_is_plain_reuse():
    residual = torch.randn(1, 3, 4)
    assert torch.equal(_policy_call(2, {0: residual}, 3), residual)
