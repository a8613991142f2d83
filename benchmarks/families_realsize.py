"""Every supported family at its real size through its real diffusers pipeline: each
transformer built at a published checkpoint's configuration with random weights in bf16,
driven by FluxPipeline, CogVideoXPipeline, HunyuanVideoPipeline or WanPipeline (not
cadence's reference pipelines) with precomputed random text embeddings and
``output_type="latent"``, so no text encoder or VAE is built or run; an N-step generation
timed with CUDA events for each recipe, ``cadence.accelerate`` given the pipeline object
itself, in one run on one GPU.

    python benchmarks/families_realsize.py --family flux-dev cogvideox-2b --out $OUT/families.json

One forward's time, the self-attention share (SDPA alone at the family's joint sequence,
as wan_realsize.py times it) and the linear share are measured in the run and give each
recipe's ideal speedup as in wan_realsize.py. A recipe a family refuses (or that fails)
is recorded with its error and the next one runs. ``--tiny`` runs the same code on the
CPU at a 2-block config of each family in float32, timed with time.perf_counter.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import time
from dataclasses import dataclass
from datetime import date
from unittest import mock

import torch
from diffusers import (
    CogVideoXDDIMScheduler,
    CogVideoXDPMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    WanPipeline,
    WanTransformer3DModel,
)
from flux_realsize import FLUX_DEV  # black-forest-labs/FLUX.1-dev transformer/config.json
from wan_realsize import (
    BUDGET,
    SAGE,
    WAN_1_3B,
    ForwardTimer,
    attention_time,
    calibrate,
    cast_like_from_pretrained,
    cuda_time,
    display,
    linear_time,
)

import cadence
from cadence.bench.metrics import ForwardShares, work_fraction
from cadence.models import adapter_for

# THUDM/CogVideoX-2b transformer/config.json: sinusoidal position embeddings for 13 latent
# frames (49 pixel frames) of 60 x 90 latents and 226 text tokens.
COGVIDEOX_2B = dict(
    num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
    text_embed_dim=4096, num_layers=30, sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
    max_text_seq_length=226, spatial_interpolation_scale=1.875, temporal_interpolation_scale=1.0,
    use_rotary_positional_embeddings=False,
)
# THUDM/CogVideoX-5b transformer/config.json: 3D RoPE instead of position embeddings.
COGVIDEOX_5B = {**COGVIDEOX_2B, "num_attention_heads": 48, "num_layers": 42, "use_rotary_positional_embeddings": True}
# hunyuanvideo-community/HunyuanVideo transformer/config.json (13 B parameters).
HUNYUAN_VIDEO = dict(
    in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
    num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
    guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
    rope_axes_dim=(16, 56, 56),
)
# Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json.
WAN_14B = {**WAN_1_3B, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}

TINY_TEXT = 8  # --tiny: text tokens; 64 x 64 pixels x 5 frames is 8 x 8 x 2 latents
TINY_SIZE = dict(height=64, width=64, num_frames=5)
TINY = {
    "flux": dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6)),
    "cogvideox": dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
                      text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
                      max_text_seq_length=TINY_TEXT),
    "hunyuan": dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
                    num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32,
                    pooled_projection_dim=16, guidance_embeds=True, rope_axes_dim=(4, 6, 6)),
    "wan": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
}


@dataclass(frozen=True)
class Family:
    checkpoint: str
    pipeline: type
    model: type
    config: dict
    tiny: dict
    scheduler: type  # default-constructed: its settings change the timesteps, not the cost
    size: dict  # pixels (and frames) of the generation
    guidance_scale: float
    text_tokens: int
    text_key: str  # the config key of the text embedding's width
    cfg: bool  # a negative prompt: a second branch per step
    pooled: bool = False  # a pooled CLIP embedding beside the sequence
    mask: bool = False  # the pipeline takes the text's attention mask


FAMILIES = {
    # Guidance distilled (guidance_embeds): one forward per step; 4,096 image + 512 T5 tokens.
    "flux-dev": Family("FLUX.1-dev", FluxPipeline, FluxTransformer2DModel, FLUX_DEV, TINY["flux"],
                       FlowMatchEulerDiscreteScheduler, dict(height=1024, width=1024), 3.5, 512,
                       "joint_attention_dim", cfg=False, pooled=True),
    # CFG runs as one forward of batch 2; 17,550 video + 226 text tokens.
    "cogvideox-2b": Family("CogVideoX-2b", CogVideoXPipeline, CogVideoXTransformer3DModel, COGVIDEOX_2B,
                           TINY["cogvideox"], CogVideoXDDIMScheduler, dict(height=480, width=720, num_frames=49),
                           6.0, 226, "text_embed_dim", cfg=True),
    "cogvideox-5b": Family("CogVideoX-5b", CogVideoXPipeline, CogVideoXTransformer3DModel, COGVIDEOX_5B,
                           {**TINY["cogvideox"], "use_rotary_positional_embeddings": True}, CogVideoXDPMScheduler,
                           dict(height=480, width=720, num_frames=49), 6.0, 226, "text_embed_dim", cfg=True),
    # 480 x 848 x 61 frames, not the 544 x 960 x 129 of the model card: latents 16 x 60 x 106,
    # 25,440 video + 256 text tokens, one forward ~1.6 s (FLOPs) so 10 steps stay well under
    # a minute. Embedded guidance 6.0 (the pipeline's default), no CFG. The transformer
    # always masks the padded text, so its attention cannot run on the flash kernel.
    "hunyuan-video": Family("HunyuanVideo", HunyuanVideoPipeline, HunyuanVideoTransformer3DModel, HUNYUAN_VIDEO,
                            TINY["hunyuan"], FlowMatchEulerDiscreteScheduler,
                            dict(height=480, width=848, num_frames=61), 6.0, 256, "text_embed_dim", cfg=False,
                            pooled=True, mask=True),
    # 61 frames, not 81: latents 16 x 60 x 104 (24,960 tokens). At 81 frames (32,760) one
    # forward is ~3.1 s from FLOPs and ~3.4 s scaled from the measured 1.3B forward, so 10
    # steps with CFG would take ~65 s; at 61 frames ~2.3 s, ~45 s per 10 steps.
    "wan-14b": Family("Wan2.1-T2V-14B", WanPipeline, WanTransformer3DModel, WAN_14B, TINY["wan"],
                      FlowMatchEulerDiscreteScheduler, dict(height=480, width=832, num_frames=61), 5.0, 512,
                      "text_dim", cfg=True),
    # wan_realsize.py's model and size, to compare with the reference pipeline path.
    "wan-1.3b": Family("Wan2.1-T2V-1.3B", WanPipeline, WanTransformer3DModel, WAN_1_3B, TINY["wan"],
                       FlowMatchEulerDiscreteScheduler, dict(height=480, width=832, num_frames=81), 5.0, 512,
                       "text_dim", cfg=True),
}
RECIPES = ["baseline", "compile", f"compile + fp8 + {SAGE}", f"fixed-interval(budget={BUDGET}) + compile + {SAGE}"]


class HostEvent:
    """torch.cuda.Event's timing interface on time.perf_counter: under --tiny the CUDA-event
    code (cuda_time, ForwardTimer, linear_time) runs unchanged on the CPU."""

    def __init__(self, enable_timing: bool = True):
        self.time = 0.0

    def record(self) -> None:
        self.time = time.perf_counter()

    def elapsed_time(self, end: "HostEvent") -> float:
        return 1000 * (end.time - self.time)


HOST_CLOCK = dict(Event=HostEvent, synchronize=lambda: None, reset_peak_memory_stats=lambda: None)


class Generate:
    """One seeded generation through the diffusers pipeline. Called as ``generate(steps=N)``
    with a ``transformer`` attribute, it is what wan_realsize.calibrate drives."""

    def __init__(self, pipe, inputs: dict, device: str):
        self.pipe, self.transformer, self.inputs, self.device = pipe, pipe.transformer, inputs, device

    def __call__(self, steps: int):
        generator = torch.Generator(self.device).manual_seed(0)
        return self.pipe(num_inference_steps=steps, generator=generator, output_type="latent", **self.inputs)


def build_pipeline(family: Family, transformer, scheduler):
    """The family's diffusers pipeline with None for its text encoders, tokenizers and VAE:
    the prompt arrives as embeddings and the output leaves as latents, so none of them runs
    (each pipeline falls back to the VAE's published scale factors, 8 and 4, without one)."""
    required = [p.name for p in inspect.signature(family.pipeline.__init__).parameters.values()
                if p.default is p.empty and p.name not in ("self", "transformer", "scheduler")]
    pipe = family.pipeline(transformer=transformer, scheduler=scheduler, **dict.fromkeys(required))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def text_inputs(family: Family, config: dict, tokens: int, device: str, dtype) -> dict:
    """Random embeddings in the shapes the pipeline's text encoders give (batch 1)."""
    width = config[family.text_key]
    inputs = {"prompt_embeds": torch.randn(1, tokens, width, device=device, dtype=dtype)}
    if family.cfg:
        inputs["negative_prompt_embeds"] = torch.randn(1, tokens, width, device=device, dtype=dtype)
    if family.pooled:
        inputs["pooled_prompt_embeds"] = torch.randn(1, config["pooled_projection_dim"], device=device, dtype=dtype)
    if family.mask:  # the cost of attention does not depend on how much of the text is padding
        inputs["prompt_attention_mask"] = torch.ones(1, tokens, device=device, dtype=torch.long)
    return inputs


def capture_call(transformer, generate: Generate) -> tuple[tuple, dict]:
    """The arguments of the last transformer call of a 2-step warm-up generation (kernels,
    cuBLAS handles, allocator), replayed to time one forward."""
    seen = {}
    handle = transformer.register_forward_pre_hook(lambda _, args, kwargs: seen.update(call=(args, kwargs)),
                                                   with_kwargs=True)
    generate(steps=2)
    handle.remove()
    return seen["call"]


def run_family(name: str, args, recipes: list[str], save) -> dict:
    family, device = FAMILIES[name], "cpu" if args.tiny else "cuda"
    dtype, steps = (torch.float32, 3) if args.tiny else (torch.bfloat16, args.steps)
    config = family.tiny if args.tiny else family.config
    size = {key: TINY_SIZE[key] for key in family.size} if args.tiny else family.size
    tokens = TINY_TEXT if args.tiny else family.text_tokens
    began = time.time()
    torch.manual_seed(0)
    with torch.device(device):  # float32 first, as from_pretrained: 53 GiB at most (Wan 14B), then cast
        transformer = cast_like_from_pretrained(family.model(**config), dtype).eval()
    pipe = build_pipeline(family, transformer, family.scheduler())
    generate = Generate(pipe, {**size, "guidance_scale": family.guidance_scale,
                               **text_inputs(family, config, tokens, device, dtype)}, device)

    call_args, call_kwargs = capture_call(transformer, generate)
    adapter = adapter_for(transformer)
    layout = adapter.token_layout(call_args, call_kwargs)  # joint attention counts the text tokens

    def forward():
        with torch.no_grad():
            transformer(*call_args, **call_kwargs)

    forward_s = min(cuda_time(forward) for _ in range(3))
    attention_s = attention_time(config["num_attention_heads"], config["attention_head_dim"], layout.tokens,
                                 len(adapter.attention_modules()), call_kwargs["hidden_states"].shape[0],
                                 family.mask, device, dtype)
    linear_s = min(linear_time(transformer, forward) for _ in range(2))
    attention_share, linear_share = attention_s / forward_s, linear_s / forward_s
    meta = {
        "device": "cpu (--tiny)" if args.tiny else torch.cuda.get_device_name(), "torch": torch.__version__,
        "date": date.today().isoformat(), "family": name, "pipeline": family.pipeline.__name__,
        "config": f"{family.checkpoint}{' tiny' if args.tiny else ''}, random weights, {str(dtype)[6:]}",
        "size": size, "tokens": layout.tokens, "text_tokens": tokens, "steps": steps, "cfg": family.cfg,
        "guidance_scale": family.guidance_scale, "one_forward_ms": 1000 * forward_s,
        "self_attention_ms": 1000 * attention_s, "attention_share": attention_share,
        "linear_ms": 1000 * linear_s, "linear_share": linear_share,
    }
    needed = {t for t in ("teacache", "magcache", "ertacache") if any("{" + t + "}" in r for r in recipes)}
    calibration_began, paths = time.time(), {}
    # Through the real pipeline (Generate takes calibrate's steps=), on 8 steps at least: TeaCache's
    # degree-4 fit needs 5 step transitions; the curves are resampled to the run's steps.
    try:
        folder = f"{args.calibration_dir}/{name}"
        paths = calibrate(generate, {}, max(steps, 8), needed, folder) if needed else {}
    except Exception as error:  # the recipes that need it then fail with a KeyError of its name
        meta["calibration_error"] = f"{type(error).__name__}: {error}"
    meta["calibration_s"] = time.time() - calibration_began
    run = {"meta": meta, "results": []}
    baseline_s = None
    for template in recipes:
        acceleration = timer = None
        try:
            text = template.format(steps=steps, **paths)
            acceleration = cadence.accelerate(pipe, text)  # the diffusers pipeline itself
            context = cadence.get_context(transformer)
            assert context is None or context.scheduler is pipe.scheduler, "accelerate() did not see the pipeline"
            if acceleration.recipe:  # compile, tune Triton kernels; 4: a budget of 0.4 needs at least 3 steps
                generate(steps=4)
            timer = ForwardTimer(transformer)
            torch.cuda.reset_peak_memory_stats()
            seconds = cuda_time(lambda: generate(steps=steps))
            stats = acceleration.stats()
            baseline_s = baseline_s if acceleration.recipe else seconds
            fraction = work_fraction(stats, ForwardShares(attention_share, linear_share), acceleration.recipe) or 1.0
            result = {
                "recipe": display(template, steps), "seconds": seconds, "per_step_ms": 1000 * seconds / steps,
                "speedup": baseline_s / seconds if baseline_s else None,
                "compute_fraction": stats.get("compute_fraction"),
                "attention_fraction": stats.get("attention_fraction"),
                "ideal_speedup": 1 / fraction, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                **timer.split(stats.get("schedule") or {}),
            }
        except Exception as error:  # a recipe the family refuses, or out of memory: record it, go on
            result = {"recipe": display(template, steps), "error": f"{type(error).__name__}: {error}"}
        finally:
            for handle in timer.handles if timer else []:
                handle.remove()
            if acceleration is not None:
                acceleration.remove()
        run["results"].append(result)
        print(json.dumps(result), flush=True)
        save(run)
    meta["wall_s"] = time.time() - began
    return run


def print_table(run: dict) -> None:
    meta = run["meta"]
    print(f"\n{meta['family']} ({meta['config']}, {meta['pipeline']}) on {meta['device']}: {meta['tokens']} tokens, "
          f"{meta['steps']} steps{' with CFG' if meta['cfg'] else ''}; one forward {meta['one_forward_ms']:.0f} ms, "
          f"self-attention {meta['attention_share']:.0%}, linears {meta['linear_share']:.0%}")
    print(f"{'recipe':<70} {'seconds':>8} {'ms/step':>8} {'speedup':>8} {'ideal':>6} {'peak GiB':>9}")
    for r in run["results"]:
        if "error" in r:
            print(f"{r['recipe']:<70} {r['error'][:100]}")
            continue
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        print(f"{r['recipe']:<70} {r['seconds']:>8.2f} {r['per_step_ms']:>8.1f} {speedup:>8} "
              f"{r['ideal_speedup']:>5.2f}x {r['peak_mem_gib']:>9.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", nargs="+", choices=list(FAMILIES), default=["flux-dev", "cogvideox-2b"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--recipes", nargs="+", default=RECIPES,
                        help="recipe strings; {teacache}, {magcache}, {ertacache}: a calibration made in the run")
    parser.add_argument("--calibration-dir", default="/tmp/cadence-calibration")
    parser.add_argument("--out", default="families_realsize.json")
    parser.add_argument("--tiny", action="store_true", help="the same code on the CPU at 2-block configs, 3 steps")
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 64  # one graph per distinct recipe (see wan_realsize.py)
    runs = []

    def save(current: dict, path: str = args.out + ".partial") -> None:  # what finished survives a time-out
        with open(path, "w") as f:
            json.dump([*runs, current] if current else runs, f, indent=1)

    with mock.patch.multiple(torch.cuda, **HOST_CLOCK) if args.tiny else contextlib.nullcontext():
        for name in args.family:
            try:
                runs.append(run_family(name, args, args.recipes, save))
                print_table(runs[-1])
            except Exception as error:  # a family that cannot be built or run (out of memory): the next runs
                runs.append({"meta": {"family": name}, "error": f"{type(error).__name__}: {error}"})
                print(json.dumps(runs[-1]), flush=True)
            save({})
            gc.collect()
            torch.cuda.empty_cache()
    save({}, args.out)


if __name__ == "__main__":
    main()
