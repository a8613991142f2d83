"""The step-reuse engine every policy shares: budget pacing, head/tail blocks, CFG reuse,
batched CFG, and the policies that need no calibration (first-blocks, taylorseer)."""

import pytest
import torch
from conftest import text

import cadence
from cadence.accel.cache._base import _Pacer
from cadence.accel.cache.first_block import FirstBlocksConfig
from cadence.accel.cache.fixed_interval import FixedIntervalConfig
from cadence.accel.cache.taylorseer import TaylorSeerConfig, forecast
from cadence.context import get_context

UNCALIBRATED = {
    "fixed-interval": FixedIntervalConfig,
    "first-blocks": FirstBlocksConfig,
    "taylorseer": TaylorSeerConfig,
}


def test_pacer_spaces_a_unit_distance_evenly_and_spends_every_slot():
    steps, pacer, computed, last = 20, _Pacer(10), [0], 0
    pacer.spend(None, 0)  # step 0: the first forward always computes
    for step in range(1, steps):
        since = step - last
        if pacer.decide(float(since), since, steps - step):
            pacer.spend(float(since), since)
            computed.append(step)
            last = step
    assert computed == list(range(0, 20, 2))
    assert pacer.slots == 0


def test_pacer_moves_computes_to_where_the_distance_grows():
    """A distance that grows ten times faster in the second half gets the computes there."""
    steps, pacer, computed, last, distance = 20, _Pacer(6), [0], 0, 0.0
    pacer.spend(None, 0)
    for step in range(1, steps):
        distance += 0.1 if step < 10 else 1.0
        since = step - last
        if pacer.decide(distance, since, steps - step):
            pacer.spend(distance, since)
            computed.append(step)
            last, distance = step, 0.0
    assert len(computed) == 6
    assert sum(step >= 10 for step in computed) > sum(0 < step < 10 for step in computed)


@pytest.mark.parametrize("name", sorted(UNCALIBRATED))
@pytest.mark.parametrize("budget", [0.5, 0.6, 0.75])
def test_budget_is_never_exceeded(pipe, generate, name, budget):
    config = UNCALIBRATED[name](budget=budget, warmup=2)
    with cadence.accelerate(pipe, config) as acceleration:
        generate(pipe, steps=12)
        generate(pipe, steps=7, seed=1)
        fraction = acceleration.stats()["compute_fraction"]
    assert fraction <= budget + 1e-9
    assert fraction < 1


@pytest.mark.parametrize("name", sorted(UNCALIBRATED))
def test_budget_one_is_bit_identical(pipe, generate, name):
    baseline = generate(pipe)
    with cadence.accelerate(pipe, UNCALIBRATED[name](budget=1.0)) as acceleration:
        assert torch.equal(generate(pipe), baseline)
        assert acceleration.stats()["compute_fraction"] == 1.0


@pytest.mark.parametrize("config", [FirstBlocksConfig(threshold=0.0), TaylorSeerConfig(interval=1, order=2)],
                         ids=str)
def test_never_reusing_is_bit_identical(pipe, generate, config):
    baseline = generate(pipe)
    with cadence.accelerate(pipe, config):
        assert torch.equal(generate(pipe), baseline)


@pytest.mark.parametrize("config", [FirstBlocksConfig(threshold=0.3, first_blocks=1, last_blocks=1),
                                    TaylorSeerConfig(interval=2, order=2), FixedIntervalConfig(cfg_reuse=True)],
                         ids=str)
def test_remove_restores_and_error_is_bounded(pipe, generate, config):
    baseline = generate(pipe, steps=16)
    with cadence.accelerate(pipe, config) as acceleration:
        accelerated = generate(pipe, steps=16)
        fraction = acceleration.stats()["compute_fraction"]
    assert fraction < 1
    relative = float((accelerated - baseline).norm() / baseline.norm())
    assert 0 < relative < 0.25
    assert torch.equal(generate(pipe, steps=16), baseline)
    assert get_context(pipe.transformer) is None


def test_first_blocks_reuses_more_as_the_threshold_grows(video_pipe, generate):
    fractions = []
    for threshold in (0.0, 0.05, 0.2, 1.0):
        with cadence.accelerate(video_pipe, FirstBlocksConfig(threshold=threshold)) as acceleration:
            generate(video_pipe, steps=12)
            fractions.append(acceleration.stats()["compute_fraction"])
    assert fractions[0] == 1.0
    assert fractions == sorted(fractions, reverse=True)
    assert fractions[-1] < fractions[1]


def test_first_blocks_head_and_tail_blocks_always_run(video_pipe, generate):
    """3 blocks, Fn=1, Bn=1, never recomputing after step 0: every reused forward still runs
    2 of 3 blocks."""
    config = FirstBlocksConfig(threshold=1e9, first_blocks=1, last_blocks=1)
    with cadence.accelerate(video_pipe, config) as acceleration:
        generate(video_pipe, steps=5)
        fraction = acceleration.stats()["compute_fraction"]
    assert fraction == pytest.approx((3 + 4 * 2) / (5 * 3))


def test_head_and_tail_that_cover_the_stack_are_refused(video_pipe):
    with pytest.raises(ValueError, match="leave nothing to reuse in a stack of 3 blocks"):
        cadence.accelerate(video_pipe, FirstBlocksConfig(first_blocks=2, last_blocks=1))


def test_taylor_forecast_is_exact_on_polynomials_of_its_order():
    def f(t):
        return torch.tensor([1.0 + 2 * t - 0.25 * t * t, 3.0 - t])

    points = [(0, f(0)), (3, f(3)), (4, f(4))]  # unevenly spaced, as budget mode may place them
    assert torch.allclose(forecast(points, 6), f(6))
    assert torch.allclose(forecast(points[-2:], 5), f(4) + (f(4) - f(3)))  # order 1: linear
    assert torch.equal(forecast(points[-1:], 9), f(4))  # order 0: reuse


def test_taylor_forecast_beats_plain_reuse(video_pipe, generate):
    baseline = generate(video_pipe, steps=16)
    errors = {}
    for order in (0, 1):
        with cadence.accelerate(video_pipe, TaylorSeerConfig(interval=4, order=order)):
            errors[order] = float((generate(video_pipe, steps=16) - baseline).norm())
    assert errors[1] < errors[0]


def _count_forwards(model):
    calls = []
    handle = model.proj_out.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_cfg_reuse_skips_the_unconditional_forward_on_reused_steps(video_pipe, generate):
    calls, handle = _count_forwards(video_pipe.transformer)
    with cadence.accelerate(video_pipe, FixedIntervalConfig(interval=2, cfg_reuse=True)) as acceleration:
        generate(video_pipe, steps=9)
        stats = acceleration.stats()
    handle.remove()
    computed_steps = FixedIntervalConfig(interval=2).expected_fraction(9) * 9
    assert len(calls) == 9 + computed_steps  # cond every step, uncond only on computed steps
    assert stats["forwards"] == 18


def test_cfg_reuse_with_every_step_computed_is_bit_identical(video_pipe, generate):
    baseline = generate(video_pipe)
    with cadence.accelerate(video_pipe, FixedIntervalConfig(interval=1, cfg_reuse=True)):
        assert torch.equal(generate(video_pipe), baseline)


def test_cfg_reuse_keeps_guidance(video_pipe, generate):
    """The reused unconditional output is the cond output minus the stored difference, so
    guidance still acts on reused steps."""
    with cadence.accelerate(video_pipe, FixedIntervalConfig(interval=3, cfg_reuse=True)):
        guided = generate(video_pipe, guidance_scale=4.0)
        unguided = generate(video_pipe, guidance_scale=1.0)
    assert not torch.allclose(guided, unguided)


def _denoise_batched(model, steps: int, batch: int = 2) -> torch.Tensor:
    """CFG as one batch of 2 (cond and uncond stacked), as many pipelines run it."""
    x = torch.randn(1, 3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    embeds = torch.cat([text(seed=1), text(seed=2)])
    for step in range(steps):
        t = torch.full((batch,), 1000.0 * (1 - step / steps))
        with model.cache_context("cond", step_index=step, num_inference_steps=steps):
            velocity = model(hidden_states=x.repeat(batch, 1, 1, 1, 1), timestep=t, encoder_hidden_states=embeds,
                             return_dict=False)[0]
        cond, uncond = velocity.chunk(2)
        x = x - (uncond + 3.0 * (cond - uncond)) / steps
    return x


@pytest.mark.parametrize("name", sorted(UNCALIBRATED))
def test_cfg_as_a_batch_of_two(make_model, name):
    model = make_model["wan"]()
    with torch.no_grad():
        baseline = _denoise_batched(model, 10)
        with cadence.accelerate(model, UNCALIBRATED[name](budget=0.5)) as acceleration:
            accelerated = _denoise_batched(model, 10)
            fraction = acceleration.stats()["compute_fraction"]
        assert torch.equal(_denoise_batched(model, 10), baseline)
    assert fraction <= 0.5
    assert float((accelerated - baseline).norm() / baseline.norm()) < 0.3


def test_budget_mode_without_a_step_count_says_how_to_give_one(make_model):
    model = make_model["wan"]()
    x, embeds = torch.randn(1, 3, 2, 8, 8), text()
    with cadence.accelerate(model, FixedIntervalConfig(budget=0.5)):
        with pytest.raises(RuntimeError, match="budget mode needs the number of denoising steps"):
            model(hidden_states=x, timestep=torch.tensor([900.0]), encoder_hidden_states=embeds)


def test_budget_below_the_head_and_tail_blocks_is_refused(video_pipe):
    with pytest.raises(ValueError, match=r"budget=0.3 is below the 1/3 of the block work"):
        cadence.accelerate(video_pipe, FirstBlocksConfig(budget=0.3))


def test_budget_that_allows_no_computed_forward_is_refused(video_pipe, generate):
    with cadence.accelerate(video_pipe, FixedIntervalConfig(budget=0.05)):
        with pytest.raises(ValueError, match=r"budget=0.05 allows no computed forward in 10 steps.*smallest budget "
                                             r"here is 0.100"):
            generate(video_pipe, steps=10)


@pytest.mark.parametrize("name", sorted(UNCALIBRATED))
@pytest.mark.parametrize("budget", [-0.1, 1.5, float("nan")])
def test_budget_outside_zero_one_is_refused(name, budget):
    with pytest.raises(ValueError, match=rf"{name}: budget=.* must be in \(0, 1\]"):
        UNCALIBRATED[name](budget=budget)


@pytest.mark.parametrize("params", [dict(threshold=-0.1), dict(first_blocks=0), dict(last_blocks=-1),
                                    dict(max_skip=-1)])
def test_first_blocks_refuses_bad_parameters(params):
    with pytest.raises(ValueError, match="first-blocks: .* must be"):
        FirstBlocksConfig(**params)


@pytest.mark.parametrize("params", [dict(interval=0), dict(order=3), dict(order=-1)])
def test_taylorseer_refuses_bad_parameters(params):
    with pytest.raises(ValueError, match="taylorseer: .*(must be|valid:)"):
        TaylorSeerConfig(**params)


class _NamedContextPipeline:
    """As diffusers' FLUX, CogVideoX, HunyuanVideo and LTX pipelines call the transformer:
    a cache context with a name only; the step count is in the scheduler."""

    def __init__(self, model, steps: int):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.transformer = model
        self.scheduler = FlowMatchEulerDiscreteScheduler()
        self.scheduler.set_timesteps(steps)

    def __call__(self):
        x, embeds = torch.randn(1, 3, 2, 8, 8, generator=torch.Generator().manual_seed(0)), text()
        for t in self.scheduler.timesteps:
            with self.transformer.cache_context("cond"):
                x = x - 0.1 * self.transformer(hidden_states=x, timestep=t[None], encoder_hidden_states=embeds,
                                               return_dict=False)[0]
        return x


def test_budget_mode_reads_the_step_count_from_the_pipelines_scheduler(make_model):
    pipe = _NamedContextPipeline(make_model["wan"](), steps=10)
    with torch.no_grad(), cadence.accelerate(pipe, FixedIntervalConfig(budget=0.4)) as acceleration:
        pipe()
        stats = acceleration.stats()
    assert stats["compute_fraction"] == pytest.approx(0.4)
    assert len(stats["schedule"]["cond"]) == 10


def test_step_is_read_from_the_largest_timestep(make_model):
    """LTX's conditioning pipelines pin the first frame's tokens at t = 0 (per-token
    timesteps): the step must still advance."""
    model = make_model["wan"]()
    x, embeds = torch.randn(1, 3, 2, 8, 8), text()
    with torch.no_grad(), cadence.accelerate(model, FixedIntervalConfig(interval=2)) as acceleration:
        for t in (900.0, 800.0, 700.0):
            timestep = torch.full((1, 32), t)  # (B, tokens): 2 x 4 x 4 patches
            timestep[:, :16] = 0.0  # the first frame is the condition
            model(hidden_states=x, timestep=timestep, encoder_hidden_states=embeds)
        assert get_context(model).step_index == 2
        assert acceleration.stats()["compute_fraction"] == pytest.approx(2 / 3)
