import pytest
import torch

import cadence
from cadence.accel.cache.fixed_interval import FixedIntervalConfig
from cadence.context import get_context


def test_interval_one_is_bit_identical(pipe, generate):
    baseline = generate(pipe)
    with cadence.accelerate(pipe, FixedIntervalConfig(interval=1)) as acceleration:
        accelerated = generate(pipe)
        assert acceleration.stats()["compute_fraction"] == 1.0
    assert torch.equal(baseline, accelerated)


def test_remove_restores_bit_identical_outputs(pipe, generate):
    baseline = generate(pipe)
    forward_before = {name: m.forward for name, m in pipe.transformer.named_modules()}
    acceleration = cadence.accelerate(pipe, "fixed-interval(interval=3)")
    accelerated = generate(pipe)
    acceleration.remove()
    assert not torch.equal(baseline, accelerated)  # the technique did something
    assert torch.equal(baseline, generate(pipe))
    assert get_context(pipe.transformer) is None
    for name, module in pipe.transformer.named_modules():
        hooks = getattr(module, "_diffusers_hook", None)
        assert hooks is None or not any(h.startswith("cadence") for h in hooks.hooks), name
        assert module.forward == forward_before[name] or name == "", name


@pytest.mark.parametrize("interval,warmup,cooldown,steps", [(2, 1, 0, 10), (3, 2, 1, 12), (4, 0, 0, 9), (5, 1, 2, 7)])
def test_computes_exactly_the_scheduled_fraction(video_pipe, generate, interval, warmup, cooldown, steps):
    config = FixedIntervalConfig(interval=interval, warmup=warmup, cooldown=cooldown)
    with cadence.accelerate(video_pipe, config) as acceleration:
        generate(video_pipe, steps=steps)
        stats = acceleration.stats()
    assert stats["compute_fraction"] == pytest.approx(config.expected_fraction(steps))
    assert stats["forwards"] == 2 * steps  # cond + uncond per step


def test_error_bound_against_unaccelerated(pipe, generate):
    """Reuse every other step on a smooth trajectory stays close to the baseline: the error
    is bounded by the residual change between neighbouring steps."""
    baseline = generate(pipe, steps=20)
    with cadence.accelerate(pipe, FixedIntervalConfig(interval=2)):
        accelerated = generate(pipe, steps=20)
    relative = (accelerated - baseline).norm() / baseline.norm()
    assert 0 < relative < 0.25


def test_cfg_branches_keep_separate_caches(video_pipe, generate):
    """With guidance the cond and uncond residuals differ; mixing them would make CFG a no-op
    on reused steps. Same recipe with and without CFG must give different outputs."""
    with cadence.accelerate(video_pipe, FixedIntervalConfig(interval=2)):
        with_cfg = generate(video_pipe, guidance_scale=4.0)
        without_cfg = generate(video_pipe, guidance_scale=1.0)
    assert not torch.allclose(with_cfg, without_cfg)


def test_state_resets_between_generations(pipe, generate):
    with cadence.accelerate(pipe, FixedIntervalConfig(interval=3)):
        first = generate(pipe, seed=0)
        generate(pipe, seed=1)
        again = generate(pipe, seed=0)
    assert torch.equal(first, again)


def test_works_without_a_cache_context(make_model):
    """A bare transformer call (no pipeline): the step is inferred from the timestep."""
    model = make_model["wan"]()
    x = torch.randn(1, 3, 2, 8, 8)
    text = torch.randn(1, 5, 16)
    with cadence.accelerate(model, FixedIntervalConfig(interval=2)) as acceleration:
        for t in (900.0, 800.0, 700.0):
            model(hidden_states=x, timestep=torch.tensor([t]), encoder_hidden_states=text)
        assert get_context(model).step_index == 2
        assert acceleration.stats()["compute_fraction"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("params", [dict(interval=0), dict(interval=-2), dict(warmup=-1), dict(cooldown=-1)])
def test_refuses_bad_parameters(params):
    with pytest.raises(ValueError, match="fixed-interval"):
        FixedIntervalConfig(**params)
