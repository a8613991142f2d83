import re

import pytest
import torch
from conftest import text
from diffusers.hooks import TaylorSeerCacheConfig

import cadence
from cadence.accel.cache import magcache
from cadence.accel.cache.peers import (
    PEERS,
    FasterCachePeer,
    FirstBlockCachePeer,
    MagCachePeer,
    PyramidAttentionBroadcastPeer,
    TaylorSeerPeer,
)
from cadence.accel.registry import get_technique
from cadence.recipe import Recipe
from cadence.reference.pipelines import image_ids

STEPS = 6

# Per peer: a setting that skips work on both tiny pipelines, and one that skips nothing.
# FirstBlockCache's indicator changes by 30-60 % per step on the tiny random FLUX, hence 1.0.
SKIPPING = {
    "diffusers-fbcache": "diffusers-fbcache(threshold=1.0)",
    "diffusers-magcache": "diffusers-magcache(threshold=1.0, retention_ratio=0.0, calibration={path!r})",
    "diffusers-taylorseer": "diffusers-taylorseer(cache_interval=2, disable_cache_before_step=1)",
    "diffusers-fastercache": "diffusers-fastercache(spatial_skip_range=2, timestep_skip_high=900)",
    "diffusers-pab": "diffusers-pab(spatial_skip_range=2, cross_skip_range=2, timestep_skip_high=900)",
}
DO_NOTHING = {
    "diffusers-fbcache": "diffusers-fbcache(threshold=0)",
    "diffusers-magcache": "diffusers-magcache(max_skip_steps=0, calibration={path!r})",
    "diffusers-taylorseer": "diffusers-taylorseer(cache_interval=1)",
    "diffusers-fastercache": "diffusers-fastercache(spatial_skip_range=1)",
    "diffusers-pab": "diffusers-pab(spatial_skip_range=1, cross_skip_range=1)",
}
NAMES = [config.name for config in PEERS]


class _Runner:
    """What magcache.calibrate calls: ``pipe(**run)`` on the tiny pipelines' generate."""

    def __init__(self, pipe, generate):
        self.pipe, self.generate, self.transformer = pipe, generate, pipe.transformer

    def __call__(self, **run):
        return self.generate(self.pipe, **run)


@pytest.fixture
def calibration_file(tmp_path):
    """calibration_file(pipe, generate, steps) -> path of a magcache calibration of that pipe."""

    def make(pipe, generate, steps=STEPS):
        path = tmp_path / f"magcache-{steps}.json"
        magcache.calibrate(_Runner(pipe, generate), [dict(steps=steps, seed=5)], path=path)
        return str(path)

    return make


def _recipe(table, name, pipe, generate, calibration_file) -> str:
    path = calibration_file(pipe, generate) if name == "diffusers-magcache" else ""
    return table[name].format(path=path)


def _hooks_left(model) -> list[str]:
    return [f"{name}: {hook}" for name, module in model.named_modules()
            for hook in getattr(getattr(module, "_diffusers_hook", None), "hooks", {})]


def test_every_peer_is_a_registered_step_technique():
    for config in PEERS:
        technique = get_technique(config.name)
        assert technique.config is config
        assert config.level == "step"
        assert re.match(r"diffusers' \w+ \(peer\)", config.summary), config.summary


@pytest.mark.parametrize("name", NAMES)
def test_skips_work_and_remove_restores_bit_identical_outputs(pipe, generate, calibration_file, name):
    baseline = generate(pipe, steps=STEPS)
    forward_before = {n: m.forward for n, m in pipe.transformer.named_modules()}
    acceleration = cadence.accelerate(pipe, _recipe(SKIPPING, name, pipe, generate, calibration_file))
    accelerated = generate(pipe, steps=STEPS)
    stats = acceleration.stats()
    acceleration.remove()
    assert stats["forwards"] == 2 * STEPS  # cond + uncond per step
    assert 0 < stats["compute_fraction"] < 1
    assert not torch.equal(baseline, accelerated)
    assert torch.equal(baseline, generate(pipe, steps=STEPS))
    assert not pipe.transformer.is_cache_enabled
    assert _hooks_left(pipe.transformer) == []
    for n, module in pipe.transformer.named_modules():
        assert module.forward == forward_before[n], n


@pytest.mark.parametrize("name", NAMES)
def test_do_nothing_setting_is_bit_identical(pipe, generate, calibration_file, name):
    baseline = generate(pipe, steps=STEPS)
    with cadence.accelerate(pipe, _recipe(DO_NOTHING, name, pipe, generate, calibration_file)) as acceleration:
        accelerated = generate(pipe, steps=STEPS)
        assert acceleration.stats() == {"compute_fraction": 1.0, "forwards": 2 * STEPS}
    assert torch.equal(baseline, accelerated)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "diffusers-magcache"])
def test_runs_at_the_diffusers_defaults(pipe, generate, name):
    with cadence.accelerate(pipe, name) as acceleration:
        first = generate(pipe, steps=10)
        again = generate(pipe, steps=10)  # the state of the first generation is dropped
        stats = acceleration.stats()
    assert torch.equal(first, again)
    assert stats["forwards"] == 2 * 2 * 10
    # The tiny random FLUX's first-block residual changes by 30-60 % a step, never under 5 %.
    skips = not (name == "diffusers-fbcache" and type(pipe.transformer).__name__ == "FluxTransformer2DModel")
    assert (stats["compute_fraction"] < 1) == skips


def test_magcache_at_its_defaults_and_resampled_to_another_step_count(video_pipe, generate, calibration_file):
    path = calibration_file(video_pipe, generate, steps=8)
    config = MagCachePeer(calibration=path)
    ratios, steps = config.mag_ratios(video_pipe.transformer)
    assert steps == 8 and len(ratios) == 8 and ratios[0] == 1.0
    with cadence.accelerate(video_pipe, config) as acceleration:
        generate(video_pipe, steps=8)
        assert acceleration.stats()["forwards"] == 16
    resampled = MagCachePeer(calibration=path, steps=12, threshold=1.0)
    assert len(resampled.mag_ratios(video_pipe.transformer)[0]) == 12
    with cadence.accelerate(video_pipe, resampled) as acceleration:
        generate(video_pipe, steps=12)
        assert acceleration.stats()["compute_fraction"] < 1


def test_magcache_refuses_a_run_of_another_step_count(video_pipe, generate, calibration_file):
    path = calibration_file(video_pipe, generate, steps=STEPS)
    baseline = generate(video_pipe, steps=8)
    acceleration = cadence.accelerate(video_pipe, MagCachePeer(calibration=path))
    with pytest.raises(ValueError, match=r"diffusers-magcache: set up for 6 denoising steps .* runs 8; .* steps=8"):
        generate(video_pipe, steps=8)
    acceleration.remove()
    assert torch.equal(baseline, generate(video_pipe, steps=8))


def test_magcache_without_a_calibration_says_how_to_make_one(video_pipe):
    with pytest.raises(ValueError, match="cadence calibrate"):
        cadence.accelerate(video_pipe, "diffusers-magcache")
    assert not video_pipe.transformer.is_cache_enabled
    assert _hooks_left(video_pipe.transformer) == []


@pytest.mark.parametrize("modules,expected", [("attention", (2 * 5 / 8 + 1) / 3), ("attention+ffn", 5 / 8)])
def test_taylorseer_fraction_is_the_measured_share_of_module_calls(video_pipe, generate, modules, expected):
    """Wan blocks hold attn1, attn2 and ffn, counted equally. With 8 steps, warm-up 2 and
    interval 2 the hooked modules run at steps 0, 1, 3, 5, 7."""
    config = TaylorSeerPeer(cache_interval=2, disable_cache_before_step=2, modules=modules)
    with cadence.accelerate(video_pipe, config) as acceleration:
        generate(video_pipe, steps=8)
        assert acceleration.stats()["compute_fraction"] == pytest.approx(expected)


def test_taylorseer_identifiers_reach_wan_where_diffusers_defaults_do_not(make_model):
    wan, flux = make_model["wan"](), make_model["flux"]()
    wan.enable_cache(TaylorSeerCacheConfig())  # diffusers' default identifiers
    assert _hooks_left(wan) == []  # Wan names its attention attn1/attn2: nothing matched
    wan.disable_cache()
    cache, skip = TaylorSeerPeer().identifiers(wan)
    assert cache == [r"^blocks\.\d+\.attn1$", r"^blocks\.\d+\.attn2$"] and skip == []
    # On FLUX the peer's identifiers hook exactly what diffusers' defaults hook.
    flux.enable_cache(TaylorSeerCacheConfig())
    default = _hooks_left(flux)
    flux.disable_cache()
    with cadence.accelerate(flux, TaylorSeerPeer()):
        assert [h for h in _hooks_left(flux) if "taylorseer" in h] == default


def test_taylorseer_attention_and_ffn_on_flux_single_blocks_forecast_proj_out(make_model):
    cache, skip = TaylorSeerPeer(modules="attention+ffn").identifiers(make_model["flux"]())
    assert r"^single_transformer_blocks\.\d+\.proj_out$" in cache
    assert skip == [r"^single_transformer_blocks\.\d+\.attn$", r"^single_transformer_blocks\.\d+\.proj_mlp$"]


@pytest.mark.parametrize("name", ["diffusers-pab", "diffusers-fastercache"])
def test_per_branch_state_keeps_the_cfg_branches_apart(pipe, generate, name):
    """diffusers' PAB/FasterCache state is shared by the cond and uncond forwards: the
    uncond forward gets the attention the cond forward just computed. Per branch, each
    broadcasts its own attention, and lands much closer to the baseline."""
    baseline = generate(pipe, steps=12)
    errors = {}
    for per_branch in (True, False):
        with cadence.accelerate(pipe, f"{name}(per_branch={str(per_branch).lower()})"):
            errors[per_branch] = float((generate(pipe, steps=12) - baseline).norm() / baseline.norm())
    assert 0 < errors[True] < errors[False] / 3


def test_fastercache_cfg_cache_is_refused_on_separate_cfg_forwards(video_pipe, generate):
    baseline = generate(video_pipe)
    acceleration = cadence.accelerate(video_pipe, "diffusers-fastercache(uncond_skip_range=5)")
    with pytest.raises(ValueError, match="needs the pipeline to run both CFG branches in one batched forward"):
        generate(video_pipe)
    acceleration.remove()
    assert torch.equal(baseline, generate(video_pipe))


def test_fastercache_cfg_cache_is_refused_for_token_outputs(image_pipe):
    with pytest.raises(ValueError, match="FluxTransformer2DModel's output"):
        cadence.accelerate(image_pipe, FasterCachePeer(uncond_skip_range=5))
    assert not image_pipe.transformer.is_cache_enabled
    assert _hooks_left(image_pipe.transformer) == []


def test_fastercache_refuses_a_first_step_inside_the_skip_range(make_model):
    """Where diffusers' FasterCache would raise TypeError at faster_cache.py:435."""
    model = make_model["wan"]()
    x, text = torch.randn(1, 3, 2, 8, 8), torch.randn(1, 5, 16)
    with cadence.accelerate(model, "diffusers-fastercache"):
        with model.cache_context("cond", step_index=0, num_inference_steps=10):
            with pytest.raises(ValueError, match="first forward is at timestep 500, inside .* timestep_skip_high"):
                model(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text)


def _flux_forward(model, t: float):
    """One bare forward of the tiny FLUX, passed t / 1000 as diffusers' FluxPipeline does."""
    generator = torch.Generator().manual_seed(0)
    model(hidden_states=torch.randn(1, 16, 12, generator=generator), encoder_hidden_states=text(),
          pooled_projections=torch.randn(1, 16, generator=generator), img_ids=image_ids(8, 8, "cpu"),
          txt_ids=torch.zeros(5, 3), timestep=torch.tensor([t / 1000]))


@pytest.mark.parametrize("window,skips", [((100, 900), True), ((0.05, 0.95), False)])
def test_flux_timestep_is_read_on_the_0_1000_scale(make_model, window, skips):
    """Without a sigma in the cache context (diffusers' FluxPipeline gives none) the
    timestep comes from the argument, which FLUX takes divided by 1000; PAB's window is
    in 0-1000 units."""
    model = make_model["flux"]()
    low, high = window
    with cadence.accelerate(model, PyramidAttentionBroadcastPeer(timestep_skip_low=low, timestep_skip_high=high)) \
            as acceleration:
        for step, t in enumerate((950.0, 800.0, 600.0, 400.0)):
            with model.cache_context("cond", step_index=step, num_inference_steps=4):
                _flux_forward(model, t)
        assert (acceleration.stats()["compute_fraction"] < 1) == skips


@pytest.mark.parametrize("config", [
    FirstBlockCachePeer(threshold=0.2),
    MagCachePeer(threshold=0.1, max_skip_steps=2, retention_ratio=0.3, steps=30, calibration="/tmp/m.json"),
    TaylorSeerPeer(cache_interval=3, max_order=2, disable_cache_before_step=5, disable_cache_after_step=25,
                   taylor_factors_dtype="float32", modules="attention+ffn"),
    FasterCachePeer(spatial_skip_range=3, timestep_skip_high=700, attention_weight=0.5, per_branch=False),
    PyramidAttentionBroadcastPeer(spatial_skip_range=3, cross_skip_range=6, timestep_skip_low=50,
                                  timestep_skip_high=900),
])
def test_string_form_round_trips(config):
    recipe = Recipe([config])
    assert Recipe.parse(str(recipe)) == recipe
    assert Recipe.from_toml(recipe.to_toml()) == recipe
    defaults = type(config)().params()
    for key, value in config.params().items():  # every changed setting is spelled out
        assert (f"{key}=" in str(recipe)) == (value != defaults[key]), key


def test_defaults_print_as_the_bare_name():
    for config in PEERS:
        assert str(config()) == config.name
        assert Recipe.parse(config.name) == Recipe([config()])


@pytest.mark.parametrize("name,params,message", [
    ("diffusers-fbcache", "threshold=-0.1", "threshold=-0.1 must be"),
    ("diffusers-fbcache", "threshold=nan", "threshold=nan must be"),
    ("diffusers-magcache", "threshold=-1", "threshold=-1.0 must be"),
    ("diffusers-magcache", "max_skip_steps=-1", "max_skip_steps=-1 must be >= 0"),
    ("diffusers-magcache", "retention_ratio=1.5", r"retention_ratio=1.5 must be in \[0, 1\]"),
    ("diffusers-magcache", "steps=1", "steps=1 must be >= 2"),
    ("diffusers-taylorseer", "cache_interval=0", "cache_interval=0 must be >= 1"),
    ("diffusers-taylorseer", "max_order=-1", r"max_order=-1 must be in \[0, 4\]"),
    ("diffusers-taylorseer", "disable_cache_before_step=0", "a forecast needs a computed step"),
    ("diffusers-taylorseer", "taylor_factors_dtype='int8'", "valid: bfloat16, float16, float32"),
    ("diffusers-taylorseer", "modules='mlp'", "valid: attention, attention\\+ffn"),
    ("diffusers-fastercache", "spatial_skip_range=0", "spatial_skip_range=0 must be >= 1"),
    ("diffusers-fastercache", "timestep_skip_high=1001", "first step falls inside the skip range"),
    ("diffusers-fastercache", "attention_weight=-0.3", "attention_weight=-0.3 must be"),
    ("diffusers-fastercache", "uncond_skip_range=0", "uncond_skip_range=0 must be >= 1"),
    ("diffusers-pab", "spatial_skip_range=-1", "spatial_skip_range=-1 must be >= 0"),
    ("diffusers-pab", "spatial_skip_range=0", "at least one of spatial/temporal/cross_skip_range"),
    ("diffusers-pab", "timestep_skip_low=900", "timestep_skip_low=900 must be below timestep_skip_high=800"),
    ("diffusers-pab", "threshold=0.1", "unknown parameter 'threshold'"),
])
def test_refuses_bad_parameters(name, params, message):
    with pytest.raises(ValueError, match=f"{re.escape(name)}.*{message}|{message}.*{re.escape(name)}"):
        Recipe.parse(f"{name}({params})")


@pytest.mark.parametrize("other", ["fixed-interval(interval=2)", "diffusers-pab"])
def test_refuses_a_peer_with_another_step_policy(other):
    with pytest.raises(ValueError, match="one step-reuse policy"):
        Recipe.parse(f"diffusers-fbcache + {other}")


def test_refuses_a_model_that_already_has_a_diffusers_cache(video_pipe):
    from diffusers import FirstBlockCacheConfig

    video_pipe.transformer.enable_cache(FirstBlockCacheConfig())
    with pytest.raises(ValueError, match="already has a diffusers cache enabled"):
        cadence.accelerate(video_pipe, "diffusers-pab")
    assert not any("cadence" in hook for hook in _hooks_left(video_pipe.transformer))
    video_pipe.transformer.disable_cache()
