"""Every supported family on a tiny random config: the adapter lists its blocks, reads its
modulated input, and every step technique runs on it, reuses, and is removed exactly.

The models run in a plain denoising loop (no pipeline): a flow-matching Euler update of the
latent between steps, each transformer call inside ``cache_context(branch, step_index=...,
num_inference_steps=...)`` as diffusers 0.42's Wan and FLUX pipelines make it."""

import contextlib
import dataclasses
from typing import Callable

import pytest
import torch
from diffusers import (
    CogVideoXTransformer3DModel,
    FluxTransformer2DModel,
    HunyuanVideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
)
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.hooks.hooks import CacheContext, _set_cache_context
from torch.overrides import TorchFunctionMode

import cadence
from cadence.accel.cache.first_block import FirstBlocksConfig
from cadence.accel.cache.fixed_interval import FixedIntervalConfig
from cadence.accel.registry import load_builtin
from cadence.models import adapter_for, families, find_family

TEXT_DIM = 16
TEXT_TOKENS = 5
STEPS = 8


@pytest.fixture(autouse=True)
def _one_thread():
    """On tensors this small a second intra-op thread only adds synchronisation: the file
    runs about 5x slower with two threads on two busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _text(batch, seed):
    """The text embedding of a prompt (seed 1) or of the negative prompt (seed 2)."""
    return {"encoder_hidden_states": _randn(batch, TEXT_TOKENS, TEXT_DIM, seed=seed)}


# Each builder -> (model, fixed inputs, branch inputs(seed), latent shape, timestep scale).
# The latent is ``hidden_states``; the timestep is sigma * scale (FLUX takes sigma itself).


def _wan(batch):
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=3, out_channels=3,
        text_dim=TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=3, rope_max_seq_len=32,
    )
    return model, {}, lambda seed: _text(batch, seed), (batch, 3, 2, 8, 8), 1000.0


def _flux(batch, side=4):
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=12, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
        axes_dims_rope=(4, 6, 6),
    )
    grid = torch.arange(float(side))
    image_ids = torch.stack(torch.meshgrid(torch.zeros(1), grid, grid, indexing="ij"), -1)
    fixed = {"img_ids": image_ids.reshape(-1, 3), "txt_ids": torch.zeros(TEXT_TOKENS, 3)}

    def branch(seed):
        return {**_text(batch, seed), "pooled_projections": _randn(batch, TEXT_DIM, seed=seed + 10)}

    return model, fixed, branch, (batch, side * side, 12), 1.0  # packed latent: (B, tokens, channels)


def _sd3(batch, side=8):
    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, caption_projection_dim=16,
        pooled_projection_dim=TEXT_DIM, pos_embed_max_size=8,
    )

    def branch(seed):
        return {**_text(batch, seed), "pooled_projections": _randn(batch, TEXT_DIM, seed=seed + 10)}

    return model, {}, branch, (batch, 4, side, side), 1000.0


def _cogvideox(batch):
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=TEXT_DIM, num_layers=3, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
        max_text_seq_length=TEXT_TOKENS,
    )
    return model, {}, lambda seed: _text(batch, seed), (batch, 2, 4, 8, 8), 1000.0  # (B, frames, C, H, W)


def _hunyuan_video(batch, image_condition_type=None, text_tokens=TEXT_TOKENS):
    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=TEXT_DIM,
        pooled_projection_dim=8, guidance_embeds=False, rope_axes_dim=(2, 2, 4),
        image_condition_type=image_condition_type,  # "token_replace": the I2V variant's blocks
    )

    def branch(seed):
        # Prompts shorter than the text length are padded: the mask hides the padding.
        mask = (torch.arange(TEXT_TOKENS) < text_tokens).float().expand(batch, -1)
        return {**_text(batch, seed), "encoder_attention_mask": mask, "pooled_projections": _randn(batch, 8, seed=seed + 10)}

    return model, {}, branch, (batch, 4, 2, 8, 8), 1000.0


def _ltx(batch):
    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        num_layers=3, caption_channels=TEXT_DIM,
    )
    fixed = {"num_frames": 2, "height": 4, "width": 4}

    def branch(seed):
        return {**_text(batch, seed), "encoder_attention_mask": torch.ones(batch, TEXT_TOKENS)}

    return model, fixed, branch, (batch, 32, 8), 1000.0  # packed latent: (B, tokens, channels)


BUILDERS = {
    "WanTransformer3DModel": _wan,
    "FluxTransformer2DModel": _flux,
    "SD3Transformer2DModel": _sd3,
    "CogVideoXTransformer3DModel": _cogvideox,
    "HunyuanVideoTransformer3DModel": _hunyuan_video,
    "LTXVideoTransformer3DModel": _ltx,
}


@contextlib.contextmanager
def _cache_context(model, name, **fields):
    """``model.cache_context(name, **fields)``. SD3Transformer2DModel has no CacheMixin, so
    no such method (and the SD3 pipeline sets no context): set diffusers' context on its
    hooks the way the method does."""
    if hasattr(model, "cache_context"):
        with model.cache_context(name, **fields):
            yield
        return
    _set_cache_context(model, CacheContext(name, **fields))
    try:
        yield
    finally:
        _set_cache_context(model, None)


@dataclasses.dataclass
class Tiny:
    """A tiny model of one family and what its denoising loop feeds it."""

    model: torch.nn.Module
    fixed: dict
    branch: Callable[[int], dict]  # seed -> the inputs of a prompt
    latent_shape: tuple
    timestep_scale: float

    def denoise(self, steps=STEPS, cfg=True, guidance_scale=3.0, seed=0) -> torch.Tensor:
        """Flow-matching Euler from pure noise; with ``cfg`` a cond and an uncond call per step."""
        latent = _randn(*self.latent_shape, seed=seed)
        sigmas = torch.linspace(1.0, 0.0, steps + 1)
        cond, uncond = self.branch(1), self.branch(2)
        with torch.no_grad():
            for i in range(steps):
                timestep = torch.full((latent.shape[0],), float(sigmas[i]) * self.timestep_scale)
                velocity = self._call("cond", i, steps, latent, timestep, cond)
                if cfg:
                    velocity_uncond = self._call("uncond", i, steps, latent, timestep, uncond)
                    velocity = velocity_uncond + guidance_scale * (velocity - velocity_uncond)
                latent = latent + (sigmas[i + 1] - sigmas[i]) * velocity
        return latent

    def _call(self, name, step, steps, latent, timestep, branch_inputs):
        with _cache_context(self.model, name, step_index=step, num_inference_steps=steps):
            return self.model(hidden_states=latent, timestep=timestep, **self.fixed, **branch_inputs,
                              return_dict=False)[0]


def tiny(class_name, batch=1, **options) -> Tiny:
    model, *rest = BUILDERS[class_name](batch, **options)
    return Tiny(model.eval(), *rest)


class _Pipe:
    """What ``calibrate`` drives: ``pipe(**run)`` runs a generation of ``pipe.transformer``."""

    def __init__(self, tiny_model: Tiny):
        self.tiny = tiny_model
        self.transformer = tiny_model.model

    def __call__(self, **run):
        return self.tiny.denoise(**run)


STEP_TECHNIQUES = sorted(name for name, t in load_builtin().items() if t.config.level == "step")


def test_every_adapted_family_has_a_tiny_config():
    assert set(BUILDERS) == {class_name for family in families() for class_name in family.classes}
    assert all(family.modulated_input is not None for family in families())


def _calibrate(technique):
    """A technique's ``calibrate(pipe, runs, path)``, as it registered it."""
    calibration = load_builtin()[technique].calibration
    assert calibration is not None, f"{technique} has a calibration field but registered no calibration"
    return calibration.run


def _reusing_config(technique, tiny_model, tmp_path):
    """The technique in a setting that reuses on 8 steps of a random model: budget 0.5 (the
    pacer then reuses on half the steps whatever the indicator says); for a diffusers peer,
    which has no budget, a threshold of 1 (a relative change under 100 %: nearly always
    reuse) or its defaults (a fixed schedule). Calibrated first on two seeds if it needs it."""
    config_class = load_builtin()[technique].config
    fields = {f.name for f in dataclasses.fields(config_class)}
    params = {"budget": 0.5} if "budget" in fields else {"threshold": 1.0} if "threshold" in fields else {}
    if "calibration" in fields:
        runs = [{"seed": 1}, {"seed": 2}]
        path = _calibrate(technique)(_Pipe(tiny_model), runs, path=tmp_path / f"{technique}.json")
        params["calibration"] = str(path)
    return config_class(**params)


@pytest.mark.parametrize("class_name", BUILDERS)
@pytest.mark.parametrize("technique", STEP_TECHNIQUES)
def test_step_technique_reuses_and_remove_restores(technique, class_name, tmp_path):
    tiny_model = tiny(class_name)
    baseline = tiny_model.denoise()
    config = _reusing_config(technique, tiny_model, tmp_path)
    try:
        acceleration = cadence.accelerate(tiny_model.model, config)
    except (ValueError, TypeError) as error:
        # Peers wrapping diffusers' own hooks support the families diffusers does; they must
        # say which model they refuse.
        if not technique.startswith("diffusers-"):
            raise
        assert class_name in str(error) or find_family(class_name).name in str(error), error
        return
    with acceleration:
        accelerated = tiny_model.denoise()
        stats = acceleration.stats()
    assert accelerated.shape == baseline.shape
    assert torch.isfinite(accelerated).all()
    assert stats["compute_fraction"] < 1, stats
    assert not torch.equal(accelerated, baseline)  # reused forwards changed the result
    assert torch.equal(tiny_model.denoise(), baseline)


@pytest.mark.parametrize("class_name", BUILDERS)
def test_fixed_interval_without_cfg(class_name):
    """The plain loop (one branch) on every family: the scheduled fraction is computed."""
    tiny_model = tiny(class_name)
    config = FixedIntervalConfig(interval=2)
    with cadence.accelerate(tiny_model.model, config) as acceleration:
        out = tiny_model.denoise(cfg=False)
        stats = acceleration.stats()
    assert out.shape == tiny_model.latent_shape and torch.isfinite(out).all()
    assert stats["compute_fraction"] == pytest.approx(config.expected_fraction(STEPS))
    assert stats["forwards"] == STEPS


@pytest.mark.parametrize("class_name", BUILDERS)
def test_reuse_of_an_unchanged_input_gives_the_computed_output(class_name):
    """Step 1 sees exactly step 0's input, so its reused forward must reproduce step 0's
    output. With a head and a tail block around a one-block span, this checks that the
    hooks read each family's block arguments and pack its outputs (video and text stream)
    in the order its forward expects."""
    tiny_model = tiny(class_name)
    latent = _randn(*tiny_model.latent_shape, seed=0)
    timestep = torch.full((1,), 0.5 * tiny_model.timestep_scale)
    config = FirstBlocksConfig(threshold=1e9, first_blocks=1, last_blocks=1)
    with cadence.accelerate(tiny_model.model, config) as acceleration, torch.no_grad():
        computed, reused = (tiny_model._call("cond", i, 2, latent, timestep, tiny_model.branch(1)) for i in range(2))
        assert acceleration.stats()["compute_fraction"] == pytest.approx(5 / 6)  # step 1 skipped 1 of 3 blocks
    torch.testing.assert_close(reused, computed, rtol=1e-5, atol=1e-5)


def test_sd3_as_its_pipeline_calls_it():
    """diffusers' SD3 pipeline sets no cache context and runs CFG as one batch [uncond,
    cond]: the step is inferred from the timestep, both halves share one branch."""
    tiny_model = tiny("SD3Transformer2DModel", batch=2)
    model, branch = tiny_model.model, tiny_model.branch(1)
    config = FixedIntervalConfig(interval=2)
    with cadence.accelerate(model, config) as acceleration, torch.no_grad():
        latent = _randn(*tiny_model.latent_shape, seed=0)
        for sigma, next_sigma in zip(torch.linspace(1, 0, STEPS + 1)[:-1], torch.linspace(1, 0, STEPS + 1)[1:]):
            velocity = model(hidden_states=latent, timestep=torch.full((2,), float(sigma) * 1000), **branch,
                             return_dict=False)[0]
            latent = latent + (next_sigma - sigma) * velocity
        stats = acceleration.stats()
    assert torch.isfinite(latent).all()
    assert stats["compute_fraction"] == pytest.approx(config.expected_fraction(STEPS))
    assert stats["forwards"] == STEPS


class _Inputs:
    """Records what a module receives."""

    def __init__(self, module):
        self.handle = module.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        self.args, self.kwargs = args, kwargs
        self.handle.remove()


@pytest.mark.parametrize(
    "class_name,options",
    [(name, {}) for name in BUILDERS] + [("HunyuanVideoTransformer3DModel", {"image_condition_type": "token_replace"})],
)
def test_modulated_input_is_what_the_first_self_attention_reads(class_name, options):
    """The reader gives (B, tokens, dim), finite, and equal to the normalised, timestep-
    modulated video tokens that the first block hands its self-attention."""
    tiny_model = tiny(class_name, batch=2, **options)
    adapter = adapter_for(tiny_model.model)
    first, metadata = adapter.blocks[0], adapter.metadata[0]
    attention = first.attn1 if hasattr(first, "attn1") else first.attn
    block_inputs, attention_inputs = _Inputs(first), _Inputs(attention)
    tiny_model.denoise(steps=1, cfg=False)
    args, kwargs = block_inputs.args, block_inputs.kwargs
    hidden = metadata._get_parameter_from_args_kwargs(metadata.hidden_states_argument_name, args, kwargs)
    modulated = adapter.modulated_input(first, args, kwargs, hidden)
    assert modulated.shape == hidden.shape and modulated.shape[0] == 2 and modulated.dim() == 3
    assert torch.isfinite(modulated).all()
    attended = attention_inputs.kwargs.get("hidden_states", attention_inputs.args[0] if attention_inputs.args else None)
    torch.testing.assert_close(modulated.to(attended.dtype), attended)


def test_ltx_modulated_input_with_a_timestep_per_token():
    """LTX's condition pipelines give each token its own timestep: temb is then
    (B, tokens, 6 * dim), and so is the modulation."""
    tiny_model = tiny("LTXVideoTransformer3DModel", batch=2)
    adapter = adapter_for(tiny_model.model)
    first = adapter.blocks[0]
    block_inputs, attention_inputs = _Inputs(first), _Inputs(first.attn1)
    timestep = torch.rand(2, 32, generator=torch.Generator().manual_seed(0)) * 1000  # (B, tokens)
    with torch.no_grad():
        tiny_model.model(hidden_states=_randn(*tiny_model.latent_shape, seed=0), timestep=timestep,
                         **tiny_model.fixed, **tiny_model.branch(1))
    kwargs = block_inputs.kwargs
    assert kwargs["temb"].shape[:2] == (2, 32)
    modulated = adapter.modulated_input(first, (), kwargs, kwargs["hidden_states"])
    torch.testing.assert_close(modulated, attention_inputs.kwargs["hidden_states"])


def _is_registered_block(module):
    try:
        TransformerBlockRegistry.get(type(module))
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("class_name", BUILDERS)
def test_adapter_lists_every_block_once_in_execution_order(class_name):
    tiny_model = tiny(class_name)
    adapter = adapter_for(tiny_model.model)
    order = []
    hooks = [block.register_forward_pre_hook(lambda module, args: order.append(module)) for block in adapter.blocks]
    tiny_model.denoise(steps=1, cfg=False)
    for hook in hooks:
        hook.remove()
    assert [id(m) for m in order] == [id(b) for b in adapter.blocks]  # each runs once, in this order
    # ...and nothing else of the model is a transformer block diffusers knows (the
    # HunyuanVideo token refiner's blocks are not registered: they run before the stack).
    registered = [m for m in tiny_model.model.modules() if _is_registered_block(m)]
    assert {id(m) for m in registered} == {id(b) for b in adapter.blocks}
    assert len(adapter.blocks) == len(registered) == 3


def test_model_without_adapter_is_refused_with_the_supported_list():
    class UnknownTransformer(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="UnknownTransformer") as error:
        adapter_for(UnknownTransformer())
    for class_name in (class_name for family in families() for class_name in family.classes):
        assert class_name in str(error.value)
    with pytest.raises(ValueError, match="supported: "):
        cadence.accelerate(UnknownTransformer(), "fixed-interval")


# -- token level: sparse attention ----------------------------------------------------------
TOKEN_TECHNIQUES = sorted(name for name, t in load_builtin().items() if t.config.level == "token")
# Large enough for 2 pattern blocks of 16 tokens at least: FLUX 8 x 8 and SD3 16 x 16 px
# images (64 tokens); the video families have 32 video tokens; HunyuanVideo pads its text.
SPARSE_OPTIONS = {"FluxTransformer2DModel": {"side": 8}, "SD3Transformer2DModel": {"side": 16},
                  "HunyuanVideoTransformer3DModel": {"text_tokens": 3}}


@pytest.mark.parametrize("class_name", BUILDERS)
@pytest.mark.parametrize("technique", TOKEN_TECHNIQUES)
def test_token_technique_runs_sparse_and_remove_restores(technique, class_name):
    """At density 0.5 of 16-token blocks every family's self- or joint attention runs
    sparse (text tokens dense), gives a finite, different result, and is removed exactly."""
    tiny_model = tiny(class_name, **SPARSE_OPTIONS.get(class_name, {}))
    baseline = tiny_model.denoise(steps=3)
    config_class = load_builtin()[technique].config
    dense_only = technique == "attention-backend"
    config = config_class(backend="math") if dense_only else config_class(density=0.5, block=16, dense_fraction=0)
    with cadence.accelerate(tiny_model.model, config) as acceleration:
        accelerated = tiny_model.denoise(steps=3)
        stats = acceleration.stats()
    assert torch.isfinite(accelerated).all()
    layers = len(adapter_for(tiny_model.model).attention_modules())
    if dense_only:
        assert stats["dense_calls"] == 3 * 2 * layers
        torch.testing.assert_close(accelerated, baseline, rtol=1e-4, atol=1e-4)
    else:
        assert stats["sparse_calls"] == 3 * 2 * layers and stats["density"] == 0.5
        assert not torch.equal(accelerated, baseline)
    assert torch.equal(tiny_model.denoise(steps=3), baseline)


class _SelfAttentionLengths(TorchFunctionMode):
    """Records the sequence length of every self- or joint-attention SDPA call."""

    def __init__(self):
        super().__init__()
        self.lengths = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            query, key = (args[i] if len(args) > i else kwargs[name] for i, name in enumerate(("query", "key")))
            if query.shape[-2] == key.shape[-2]:
                self.lengths.add(query.shape[-2])
        return func(*args, **kwargs)


@pytest.mark.parametrize("class_name", BUILDERS)
def test_token_layout_counts_the_attention_sequence(class_name):
    """The layout read from the transformer's arguments has as many tokens as its self-
    or joint-attention calls (HunyuanVideo's text refiner attends its text alone)."""
    tiny_model = tiny(class_name, **SPARSE_OPTIONS.get(class_name, {}))
    model_inputs = _Inputs(tiny_model.model)
    with _SelfAttentionLengths() as recorder:
        tiny_model.denoise(steps=1, cfg=False)
    layout = adapter_for(tiny_model.model).token_layout(model_inputs.args, model_inputs.kwargs)
    assert recorder.lengths - {TEXT_TOKENS} == {layout.tokens}
    assert layout.video == {"Flux": 64, "SD3T": 64}.get(class_name[:4], 32)


# -- bit level: quantized linears ----------------------------------------------------------
BIT_TECHNIQUES = ["fp8", "int8(smooth=0)", "weight-int8", "weight-int4(group=16)", "nvfp4", "mxfp4"]


@pytest.mark.parametrize("class_name", BUILDERS)
@pytest.mark.parametrize("term", BIT_TECHNIQUES)
def test_bit_technique_quantizes_the_block_linears_and_remove_restores(term, class_name):
    """Every family's block linears (the AdaLN modulation kept in full precision) are
    quantized, or skipped with the reason where a group does not divide their width; the
    result is finite and different, and remove() gives the exact model back."""
    import warnings

    from cadence.models import quantizable_linears

    tiny_model = tiny(class_name)
    baseline = tiny_model.denoise(steps=3)
    linears = quantizable_linears(tiny_model.model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*reference path runs")
        with cadence.accelerate(tiny_model.model, term) as acceleration:
            quantized = tiny_model.denoise(steps=3)
            stats = acceleration.stats()
    done = sum(stats["quantized_layers"].values())
    assert done + len(stats["skipped_layers"]) == len(linears) > 0
    assert all("not a multiple" in reason for reason in stats["skipped_layers"].values())
    assert torch.isfinite(quantized).all()
    if done:
        assert not torch.equal(quantized, baseline)
    if not term.startswith("mxfp4"):  # MXFP4's 32-channel blocks are wider than some tiny layers
        assert done > 0
    assert torch.equal(tiny_model.denoise(steps=3), baseline)


# -- graph level: regional compilation, composed with the other levels -----------------------
@pytest.mark.parametrize("class_name", BUILDERS)
def test_compile_composes_with_every_level_and_remove_restores(class_name):
    """Every family's blocks compile (traced by aot_eager: the graphs without code
    generation) under step reuse, sparse attention and quantization, giving exactly what the
    same recipe gives eagerly; remove() gives the exact model back."""
    import warnings

    tiny_model = tiny(class_name)
    baseline = tiny_model.denoise(steps=4)
    recipe = "fixed-interval(budget=0.5) + sparse-window(density=0.5) + int8(smooth=0)"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*reference path runs")
        with cadence.accelerate(tiny_model.model, recipe):
            eager = tiny_model.denoise(steps=4)
        with cadence.accelerate(tiny_model.model, f"{recipe} + compile(backend='aot_eager')") as acceleration:
            compiled = tiny_model.denoise(steps=4)
            stats = acceleration.stats()
    assert stats["compiled_blocks"] == len(adapter_for(tiny_model.model).blocks)
    assert stats["compute_fraction"] < 1 and stats["sparse_calls"] > 0
    assert torch.equal(compiled, eager)
    assert torch.equal(tiny_model.denoise(steps=4), baseline)


@pytest.mark.parametrize("class_name", BUILDERS)
def test_default_recipe_of_every_family_runs(class_name, tmp_path):
    """`cadence recipes --model FAMILY`'s recipe applies to the family and reuses steps
    (MagCache calibrated on the tiny model first; compile traced by aot_eager)."""
    from cadence.models.defaults import default_recipe

    tiny_model = tiny(class_name)
    baseline = tiny_model.denoise()
    path = _calibrate("magcache")(_Pipe(tiny_model), [{"seed": 1}], path=tmp_path / "magcache.json")
    text = default_recipe(class_name).recipe.replace("magcache(", f"magcache(calibration='{path}', ")
    with cadence.accelerate(tiny_model.model, text.replace("compile", "compile(backend='aot_eager')")) as acceleration:
        accelerated = tiny_model.denoise()
        assert acceleration.stats()["compute_fraction"] < 1
    assert torch.isfinite(accelerated).all()
    assert torch.equal(tiny_model.denoise(), baseline)
