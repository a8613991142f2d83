"""``cadence.accelerate`` takes diffusers' own pipeline objects: WanPipeline, FluxPipeline and
CogVideoXPipeline (which runs CFG as one batched forward), built with tiny random
transformers and no text encoder or VAE (the prompt arrives as embeddings, the output
leaves as latents)."""

import inspect

import pytest
import torch
from conftest import TEXT_DIM, text, tiny_flux, tiny_wan
from diffusers import (
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    WanPipeline,
)

import cadence
from cadence.accel.cache import magcache
from cadence.context import get_context


def _tiny_cogvideox():
    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=TEXT_DIM, num_layers=2, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
        max_text_seq_length=5,
    ).eval()


# name -> (pipeline class, transformer, scheduler, call arguments beyond the embeddings)
CASES = {
    "wan": (WanPipeline, tiny_wan, FlowMatchEulerDiscreteScheduler, dict(height=32, width=32, num_frames=5)),
    "flux": (FluxPipeline, tiny_flux, FlowMatchEulerDiscreteScheduler, dict(height=32, width=32)),
    "cogvideox": (CogVideoXPipeline, _tiny_cogvideox, CogVideoXDDIMScheduler, dict(height=64, width=64, num_frames=5)),
}


def _pipe(name: str):
    pipeline, transformer, scheduler, size = CASES[name]
    components = [p.name for p in inspect.signature(pipeline.__init__).parameters.values()
                  if p.default is p.empty and p.name not in ("self", "transformer", "scheduler")]
    pipe = pipeline(transformer=transformer(), scheduler=scheduler(), **dict.fromkeys(components))
    pipe.set_progress_bar_config(disable=True)
    inputs = dict(prompt_embeds=text(seed=1), guidance_scale=4.0, **size)
    if name == "flux":
        inputs["pooled_prompt_embeds"] = torch.randn(1, TEXT_DIM, generator=torch.Generator().manual_seed(3))
    else:
        inputs["negative_prompt_embeds"] = text(seed=2)
    return pipe, inputs


def _generate(pipe, inputs, steps=6):
    return pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent",
                **inputs)[0]


@pytest.mark.parametrize("name", CASES)
def test_accelerate_takes_the_pipeline_object_and_remove_restores(name):
    pipe, inputs = _pipe(name)
    baseline = _generate(pipe, inputs)
    recipe = "fixed-interval(budget=0.5) + compile(backend='aot_eager') + sparse-window(density=0.5)"
    with cadence.accelerate(pipe, recipe) as acceleration:
        assert get_context(pipe.transformer).scheduler is pipe.scheduler  # knows the step count
        accelerated = _generate(pipe, inputs)
        stats = acceleration.stats()
    assert stats["compute_fraction"] < 1 and stats["sparse_calls"] > 0, stats
    assert torch.isfinite(accelerated).all() and not torch.equal(accelerated, baseline)
    assert torch.equal(_generate(pipe, inputs), baseline)


def test_magcache_calibrates_through_a_pipeline_with_batched_cfg(tmp_path):
    """CogVideoX runs both CFG branches as one forward (cache context 'cond_uncond'): its
    curve is filed as the cond curve, which the policy reads for that branch."""
    pipe, inputs = _pipe("cogvideox")
    run = dict(num_inference_steps=6, output_type="latent", **inputs)
    path = magcache.calibrate(pipe, [run], path=tmp_path / "magcache.json")
    baseline = _generate(pipe, inputs)
    with cadence.accelerate(pipe, f"magcache(budget=0.5, calibration='{path}')") as acceleration:
        accelerated = _generate(pipe, inputs)
        assert acceleration.stats()["compute_fraction"] < 1
    assert torch.isfinite(accelerated).all() and not torch.equal(accelerated, baseline)


def test_cfg_reuse_warns_where_cfg_is_one_batched_forward():
    pipe, inputs = _pipe("cogvideox")
    with cadence.accelerate(pipe, "fixed-interval(interval=2, cfg_reuse=true)"):
        with pytest.warns(UserWarning, match="cfg_reuse does nothing here.*'cond_uncond'"):
            _generate(pipe, inputs, steps=3)
