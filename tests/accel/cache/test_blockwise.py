import math

import pytest
import torch

import cadence
from cadence.accel.cache.blockwise import BlockDeltaConfig
from cadence.context import get_context


def relative_error(accelerated, baseline):
    return float((accelerated - baseline).norm() / baseline.norm())


def test_threshold_zero_is_bit_identical(pipe, generate):
    baseline = generate(pipe)
    with cadence.accelerate(pipe, BlockDeltaConfig(threshold=0.0)) as acceleration:
        accelerated = generate(pipe)
        assert acceleration.stats()["compute_fraction"] == 1.0
    assert torch.equal(baseline, accelerated)


def test_budget_one_is_bit_identical(pipe, generate):
    baseline = generate(pipe)
    with cadence.accelerate(pipe, BlockDeltaConfig(budget=1.0)) as acceleration:
        accelerated = generate(pipe)
        assert acceleration.stats()["compute_fraction"] == 1.0
    assert torch.equal(baseline, accelerated)


def test_remove_restores_bit_identical_outputs(pipe, generate):
    baseline = generate(pipe)
    forward_before = {name: m.forward for name, m in pipe.transformer.named_modules()}
    acceleration = cadence.accelerate(pipe, "block-delta(threshold=0.3)")
    accelerated = generate(pipe)
    acceleration.remove()
    assert not torch.equal(baseline, accelerated)
    assert torch.equal(baseline, generate(pipe))
    assert get_context(pipe.transformer) is None
    for name, module in pipe.transformer.named_modules():
        hooks = getattr(module, "_diffusers_hook", None)
        assert hooks is None or not any(h.startswith("cadence") for h in hooks.hooks), name
        assert module.forward == forward_before[name] or name == "", name


def test_positive_threshold_reuses_some_blocks_with_bounded_error(pipe, generate):
    baseline = generate(pipe, steps=12)
    with cadence.accelerate(pipe, BlockDeltaConfig(threshold=0.1, max_age=3)) as acceleration:
        accelerated = generate(pipe, steps=12)
        stats = acceleration.stats()
    assert 0 < stats["compute_fraction"] < 1
    assert stats["forwards"] == 2 * 12  # cond + uncond per step
    assert all(0 < fraction < 1 for fraction in stats["block_compute_fraction"])
    assert 0 < relative_error(accelerated, baseline) < 0.1


def test_max_age_bounds_the_reuse(video_pipe, generate):
    """Even a threshold nothing reaches refreshes every block every max_age steps."""
    with cadence.accelerate(video_pipe, BlockDeltaConfig(threshold=1e9, max_age=3, warmup=1)) as acceleration:
        generate(video_pipe, steps=12)
        fractions = acceleration.stats()["block_compute_fraction"]
    assert fractions == [pytest.approx(4 / 12)] * 3  # steps 0, 3, 6, 9


@pytest.mark.parametrize("budget,steps", [(0.3, 12), (0.5, 12), (0.45, 7)])
def test_budget_is_never_exceeded_and_is_spent(pipe, generate, budget, steps):
    with cadence.accelerate(pipe, BlockDeltaConfig(budget=budget, warmup=1)) as acceleration:
        generate(pipe, steps=steps)
        generate(pipe, steps=steps, seed=1)
        fraction = acceleration.stats()["compute_fraction"]
    blocks = len(acceleration.stats()["block_compute_fraction"])
    assert fraction <= budget + 1e-9
    assert fraction >= math.floor(budget * steps * blocks) / (steps * blocks) - 1 / steps  # the pacer spends it


def test_budget_below_one_forward_is_refused(video_pipe, generate):
    with cadence.accelerate(video_pipe, BlockDeltaConfig(budget=0.1)):
        with pytest.raises(ValueError, match="at least 0.2"):
            generate(video_pipe, steps=5)


def test_cfg_branches_keep_separate_caches(video_pipe, generate):
    """The uncond branch's first block sees the same latent as the cond branch: one shared
    cache would hand it the cond delta and make CFG a no-op on reused blocks."""
    with cadence.accelerate(video_pipe, BlockDeltaConfig(threshold=1e9, max_age=100)):
        with_cfg = generate(video_pipe, guidance_scale=4.0)
        without_cfg = generate(video_pipe, guidance_scale=1.0)
    assert not torch.allclose(with_cfg, without_cfg)


def test_state_resets_between_generations(pipe, generate):
    with cadence.accelerate(pipe, BlockDeltaConfig(threshold=0.1)):
        first = generate(pipe, seed=0)
        generate(pipe, seed=1)
        again = generate(pipe, seed=0)
    assert torch.equal(first, again)


def test_works_without_a_cache_context(make_model):
    model = make_model["wan"]()
    x, text = torch.randn(1, 3, 2, 8, 8), torch.randn(1, 5, 16)
    with cadence.accelerate(model, BlockDeltaConfig(threshold=1e9, warmup=1)) as acceleration:
        for t in (900.0, 890.0, 880.0):
            model(hidden_states=x, timestep=torch.tensor([t]), encoder_hidden_states=text)
        assert acceleration.stats()["compute_fraction"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("params", [dict(threshold=-0.1), dict(threshold=math.nan), dict(threshold=math.inf),
                                    dict(max_age=0), dict(budget=1.5), dict(budget=-0.2), dict(warmup=-1),
                                    dict(cfg_reuse=True)])
def test_refuses_bad_parameters(params):
    with pytest.raises(ValueError, match="block-delta"):
        BlockDeltaConfig(**params)


def test_indicator_reads_a_strided_copy_of_long_sequences():
    from cadence.accel.cache.blockwise import indicator_sample

    short = torch.randn(1, 4096, 4)
    assert indicator_sample(short).shape == short.shape
    long = torch.randn(2, 10_000, 4)
    sample = indicator_sample(long)
    assert sample.shape == (2, 5_000, 4)
    assert torch.equal(sample, long[:, ::2])
    assert sample.untyped_storage().data_ptr() != long.untyped_storage().data_ptr()  # keeps no view of the input
