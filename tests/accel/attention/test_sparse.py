"""Sparse attention techniques on the tiny reference pipelines: exact at density 1,
exactly removed, the density they report is the one they used, bad settings refused."""

import pytest
import torch
from conftest import image_run, tiny_pipe, video_run

import cadence
from cadence.accel.attention.backend import AttentionBackendConfig
from cadence.accel.attention.heads import RouterConfig, SparseVideoGenConfig
from cadence.accel.attention.patterns import keep_count
from cadence.accel.attention.sink import SinkConfig
from cadence.accel.attention.topk import TopKConfig
from cadence.accel.attention.window import RadialConfig, WindowConfig
from cadence.accel.registry import load_builtin

SPARSE = [WindowConfig, RadialConfig, SinkConfig, TopKConfig, SparseVideoGenConfig, RouterConfig]
# 16 frames x 16 x 16 px -> 16 x 8 x 8 = 1,024 video tokens: 64 blocks of 16
VIDEO = dict(frames=16, height=16, width=16)
STEPS = 5


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _video(pipe):
    return pipe(**{**video_run(steps=STEPS), **VIDEO}).frames


def test_every_sparse_technique_is_registered_at_the_token_level():
    token = {name for name, t in load_builtin().items() if t.config.level == "token"}
    assert token == {config.name for config in SPARSE} | {"attention-backend"}


@pytest.mark.parametrize("config_class", SPARSE)
def test_reports_the_density_it_used_and_remove_restores(config_class):
    pipe = tiny_pipe("video")
    baseline = _video(pipe)
    config = config_class(density=0.25, block=16, dense_fraction=0.4)
    with cadence.accelerate(pipe, config) as acceleration:
        sparse = _video(pipe)
        stats = acceleration.stats()
    # 5 steps x 2 branches x 3 layers; the first 2 steps (0.4 x 5) dense
    assert stats["dense_calls"] == 2 * 2 * 3 and stats["sparse_calls"] == 3 * 2 * 3
    assert stats["density"] == pytest.approx(keep_count(0.25, 64) / 64)
    assert stats["attention_fraction"] == pytest.approx((12 + 18 * keep_count(0.25, 64) / 64) / 30)
    assert torch.isfinite(sparse).all() and not torch.equal(sparse, baseline)
    assert torch.equal(_video(pipe), baseline)


@pytest.mark.parametrize("config_class", SPARSE)
def test_density_one_is_dense_attention(config_class):
    pipe = tiny_pipe("video")
    baseline = _video(pipe)
    with cadence.accelerate(pipe, config_class(density=1.0, block=16, dense_fraction=0)):
        assert torch.equal(_video(pipe), baseline)


def test_every_key_block_kept_is_dense_attention_up_to_rounding():
    """A pattern that keeps every block runs the sparse path (token reorder, block mask,
    kernel) and must give dense attention's output."""
    pipe = tiny_pipe("video")
    baseline = _video(pipe)
    with cadence.accelerate(pipe, SinkConfig(density=0.999, sink=64, block=16, dense_fraction=0)) as acceleration:
        output = _video(pipe)
        assert acceleration.stats()["density"] == 1.0 and acceleration.stats()["sparse_calls"] > 0
    torch.testing.assert_close(output, baseline, rtol=1e-4, atol=1e-4)


def test_error_grows_as_density_falls():
    pipe = tiny_pipe("video")
    baseline = _video(pipe)
    errors = []
    for density in (0.75, 0.25, 0.05):
        with cadence.accelerate(pipe, WindowConfig(density=density, block=16, dense_fraction=0)):
            errors.append(float((_video(pipe) - baseline).pow(2).mean()))
    assert 0 < errors[0] < errors[1] < errors[2]


def test_flex_and_reference_agree_on_the_image_pipeline():
    """FLUX: joint text + image attention; text blocks stay dense."""
    pipe = tiny_pipe("image")
    outputs = []
    for backend in ("reference", "flex"):
        with cadence.accelerate(pipe, TopKConfig(density=0.5, block=16, dense_fraction=0, backend=backend)) as a:
            outputs.append(pipe(**{**image_run(steps=3), "height": 16, "width": 16}).images)
            assert a.stats()["sparse_calls"] > 0 and a.stats()["density"] == 0.5
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)


def test_linear_schedule_ramps_density_down():
    pipe = tiny_pipe("video")
    config = WindowConfig(density=0.25, block=16, dense_fraction=0, schedule="linear")
    with cadence.accelerate(pipe, config) as acceleration:
        _video(pipe)
        stats = acceleration.stats()
    # steps 0..4 at densities 1, 0.8125, 0.625, 0.4375, 0.25 (step 0 runs dense)
    assert stats["dense_calls"] == 6
    assert stats["density"] == pytest.approx(sum(keep_count(d, 64) for d in (0.8125, 0.625, 0.4375, 0.25)) / 4 / 64)


def test_dense_layers_stay_dense():
    pipe = tiny_pipe("video")
    with cadence.accelerate(pipe, WindowConfig(density=0.25, block=16, dense_fraction=0, dense_layers=2)) as a:
        _video(pipe)
        assert (a.stats()["dense_calls"], a.stats()["sparse_calls"]) == (2 * 2 * STEPS, 2 * STEPS)


def test_router_sends_unserved_heads_to_dense_and_counts_choices():
    pipe = tiny_pipe("video")
    with cadence.accelerate(pipe, RouterConfig(density=0.1, block=16, dense_fraction=0, min_mass=1.0)) as a:
        _video(pipe)
        stats = a.stats()
    heads = 2 * 3 * 2 * STEPS  # heads x layers x branches x steps
    assert stats["heads"]["dense"] == heads and stats["density"] == 1.0
    with cadence.accelerate(pipe, RouterConfig(density=0.1, block=16, dense_fraction=0)) as a:
        _video(pipe)
        stats = a.stats()
    assert sum(stats["heads"].values()) == heads and stats["heads"]["dense"] == 0


@pytest.mark.parametrize("config_class", [TopKConfig, SparseVideoGenConfig, RouterConfig])
def test_a_dynamic_mask_is_built_every_mask_every_steps_and_reused_between(config_class):
    pipe = tiny_pipe("video")
    with cadence.accelerate(pipe, config_class(density=0.25, block=16, dense_fraction=0)) as acceleration:
        every_call = _video(pipe)
        assert acceleration.stats()["mask_builds"] == 2 * 3 * STEPS  # branches x layers x steps
    with cadence.accelerate(pipe, config_class(density=0.25, block=16, dense_fraction=0, mask_every=2)) as acceleration:
        reused = _video(pipe)
        stats = acceleration.stats()
        assert stats["mask_builds"] == 2 * 3 * 3  # steps 0, 2, 4
        assert stats["sparse_calls"] == 2 * 3 * STEPS and stats["density"] == pytest.approx(keep_count(0.25, 64) / 64)
        # steps 1 and 3 attend through step 0's and 2's masks (a head classifier may choose as
        # it did at the step before, and give the same output)
        if config_class is TopKConfig:
            assert not torch.equal(reused, every_call)
        _video(pipe)  # a new generation builds its own masks from its first step
        assert acceleration.stats()["mask_builds"] == 2 * 2 * 3 * 3
    with cadence.accelerate(pipe, config_class(density=0.25, block=16, dense_fraction=0, mask_every=STEPS)) as a:
        _video(pipe)
        assert a.stats()["mask_builds"] == 2 * 3  # the first step's masks serve the whole generation
    assert torch.equal(_video(pipe), _video(pipe))  # removed: the model as it was


def test_mask_every_is_refused_for_a_static_pattern():
    with pytest.raises(ValueError, match="mask_every=2: sparse-window's mask depends only on the layout and is built "
                                         "once; mask_every applies to the dynamic patterns"):
        WindowConfig(mask_every=2)
    with pytest.raises(ValueError, match="mask_every=0 must be >= 1"):
        TopKConfig(mask_every=0)


@pytest.mark.parametrize("backend", ["math", "flex"])
def test_attention_backend_runs_the_chosen_backend(backend):
    pipe = tiny_pipe("video")
    baseline = _video(pipe)
    with cadence.accelerate(pipe, AttentionBackendConfig(backend=backend)) as acceleration:
        torch.testing.assert_close(_video(pipe), baseline, rtol=1e-5, atol=1e-5)
        assert acceleration.stats()["dense_calls"] == 2 * 3 * STEPS


@pytest.mark.parametrize("params,message", [
    ({"density": 0}, r"density=0 must be in \(0, 1\]"),
    ({"density": 1.5}, r"density=1.5 must be in \(0, 1\]"),
    ({"dense_fraction": -0.1}, r"dense_fraction=-0.1 must be in \[0, 1\]"),
    ({"dense_layers": -1}, "dense_layers=-1 must be >= 0"),
    ({"schedule": "cosine"}, "schedule='cosine'; valid: constant, linear"),
    ({"block": 100}, "block=100; valid: 16, 32, 64, 128, 256"),
    ({"backend": "cuda"}, "backend='cuda'; valid: auto, reference, flex, triton"),
])
def test_bad_shared_parameters_are_refused(params, message):
    with pytest.raises(ValueError, match=message):
        WindowConfig(**params)


@pytest.mark.parametrize("config_class,params,message", [
    (WindowConfig, {"time_scale": 0}, "time_scale=0 must be > 0"),
    (SinkConfig, {"sink": -1}, "sink=-1 must be >= 0"),
    (TopKConfig, {"mass": 1.0}, r"mass=1.0 must be in \[0, 1\)"),
    (SparseVideoGenConfig, {"samples": 0}, "samples=0 must be >= 1"),
    (RouterConfig, {"candidates": "window,diagonal"}, "names diagonal; valid: window, radial, spatial, temporal, topk"),
    (RouterConfig, {"min_mass": 2}, r"min_mass=2 must be in \[0, 1\]"),
    (AttentionBackendConfig, {"backend": "xformers"}, "backend='xformers'; valid: auto, cudnn, flash"),
])
def test_bad_pattern_parameters_are_refused(config_class, params, message):
    with pytest.raises(ValueError, match=message):
        config_class(**params)


def test_a_second_attention_technique_is_refused():
    pipe = tiny_pipe("video")
    with cadence.accelerate(pipe, WindowConfig(block=16)):
        with pytest.raises(ValueError, match="already has an attention technique"):
            cadence.accelerate(pipe, TopKConfig(block=16))


def test_a_backend_that_bypasses_sdpa_is_refused():
    pipe = tiny_pipe("video")
    pipe.transformer.blocks[0].attn1.processor._attention_backend = "flash"
    with pytest.raises(ValueError, match="attention backend 'flash' bypasses"):
        cadence.accelerate(pipe, WindowConfig(block=16))


def test_dense_fraction_without_a_step_count_is_refused():
    """Called outside a pipeline, the model gives no step count."""
    pipe = tiny_pipe("video")
    model = pipe.transformer
    with cadence.accelerate(model, WindowConfig(block=16, dense_fraction=0.2)):
        with pytest.raises(ValueError, match="need the number of steps"):
            model(hidden_states=torch.randn(1, 3, 2, 8, 8), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 5, 16))


def test_composes_with_step_reuse():
    pipe = tiny_pipe("video")
    recipe = "fixed-interval(interval=2) + sparse-window(density=0.25, block=16, dense_fraction=0)"
    with cadence.accelerate(pipe, recipe) as acceleration:
        output = _video(pipe)
        stats = acceleration.stats()
    assert torch.isfinite(output).all()
    assert stats["compute_fraction"] < 1 and stats["sparse_calls"] > 0


def test_every_family_has_a_default_pattern_that_parses():
    from cadence.models import families
    from cadence.recipe import Recipe

    assert families()
    for family in families():
        assert Recipe.parse(family.sparse_pattern).techniques[0].level == "token", family.name


def test_remove_gives_back_each_attention_module_its_own_processor():
    pipe = tiny_pipe("image")
    modules = [block.attn for block in (*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks)]
    processors = [module.processor for module in modules]
    with cadence.accelerate(pipe, WindowConfig(block=16)):
        assert all(module.processor is not processor for module, processor in zip(modules, processors))
    assert all(module.processor is processor for module, processor in zip(modules, processors))
    assert all("processor" not in module._modules for module in modules)


def test_a_processor_with_weights_is_refused_and_left_in_place():
    pipe = tiny_pipe("video")
    processor = torch.nn.Linear(1, 1)
    pipe.transformer.blocks[1].attn1.set_processor(processor)
    with pytest.raises(ValueError, match="Linear is a module"):
        cadence.accelerate(pipe, WindowConfig(block=16))
    assert pipe.transformer.blocks[1].attn1.processor is processor
    assert not any(type(block.attn1.processor).__name__.startswith("Routed") for block in pipe.transformer.blocks)


@pytest.mark.parametrize("config_class", [TopKConfig, RouterConfig])
def test_mask_drift_rebuilds_a_held_mask_once_queries_or_keys_moved(config_class):
    """The two bounds: a drift threshold nothing stays under rebuilds on every call (the
    output of no reuse), one nothing crosses reuses for mask_every steps (the output of
    mask_every alone); in between, some builds come early."""
    pipe = tiny_pipe("video")
    options = dict(density=0.25, block=16, dense_fraction=0)
    outputs, builds = {}, {}
    for label, extra in (("every call", {}), ("every 3", dict(mask_every=3)),
                         ("any drift", dict(mask_every=3, mask_drift=1e-9)),
                         ("no drift", dict(mask_every=3, mask_drift=1e9))):
        with cadence.accelerate(pipe, config_class(**options, **extra)) as acceleration:
            outputs[label] = _video(pipe)
            builds[label] = (acceleration.stats()["mask_builds"], acceleration.stats()["drift_rebuilds"])
    assert torch.equal(outputs["any drift"], outputs["every call"])
    assert builds["any drift"] == (2 * 3 * STEPS, 2 * 3 * (STEPS - 1))  # every build after the first held one
    assert torch.equal(outputs["no drift"], outputs["every 3"]) and builds["no drift"] == (2 * 3 * 2, 0)
    assert torch.equal(_video(pipe), _video(pipe))  # removed: the model as it was


def test_mask_drift_needs_a_held_mask():
    with pytest.raises(ValueError, match="mask_drift=0.1 refreshes a held mask, and with mask_every=1 none is held"):
        TopKConfig(mask_drift=0.1)
    with pytest.raises(ValueError, match="mask_drift=-1.0 must be >= 0"):
        TopKConfig(mask_every=2, mask_drift=-1.0)
