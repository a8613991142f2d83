"""Real-size baseline: a Wan2.1-1.3B-size WanTransformer3DModel (random weights, bf16) at
480p x 81 frames (latents 16 x 21 x 60 x 104), 50 steps with CFG, through cadence's
pipeline path (RefVideoPipeline with precomputed text embeddings), unaccelerated and with
fixed-interval step reuse, timed with CUDA events after a warm-up, in one run.

Random weights cost the same time as trained ones for a fixed amount of compute.

    python benchmarks/wan_realsize.py --out $OUT/wan_realsize.json

Later issues add their techniques to RECIPES.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date

import torch
from diffusers import WanTransformer3DModel

import cadence
from cadence.reference.pipelines import RefVideoPipeline
from cadence.reference.models import reference_model

WAN_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
LATENT = dict(frames=21, height=60, width=104)  # 480 x 832 x 81 frames through the Wan VAE (4x8x8)
TEXT_TOKENS = 512  # umT5 sequence length of the Wan pipeline
RECIPES = ["baseline", "fixed-interval(interval=2)", "fixed-interval(interval=3)"]


def cast_like_from_pretrained(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast to ``dtype`` as ``from_pretrained(torch_dtype=dtype)`` does: the modules a class
    names in ``_keep_in_fp32_modules`` (Wan: rope, time embedder, norms, modulation table)
    stay in float32, so the baseline runs the same kernels as a real checkpoint."""
    keep = set(model._keep_in_fp32_modules or [])
    torch.nn.Module.to(model, dtype)  # ModelMixin.to would warn about exactly what we undo next
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and keep.intersection(name.split(".")):
            tensor.data = tensor.data.float()
    return model


def cuda_time(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--recipes", nargs="+", default=RECIPES)
    parser.add_argument("--out", default="wan_realsize.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    with torch.device("cuda"):
        transformer = cast_like_from_pretrained(WanTransformer3DModel(**WAN_1_3B), torch.bfloat16).eval()
    pipe = RefVideoPipeline(transformer=transformer, scheduler=reference_model("ref-video").scheduler())
    pipe.set_progress_bar_config(disable=True)
    embeds = torch.randn(1, TEXT_TOKENS, 4096, device="cuda", dtype=torch.bfloat16)
    negative = torch.randn(1, TEXT_TOKENS, 4096, device="cuda", dtype=torch.bfloat16)
    call = dict(prompt_embeds=embeds, negative_prompt_embeds=negative, guidance_scale=args.guidance_scale, **LATENT)
    tokens = LATENT["frames"] * LATENT["height"] * LATENT["width"] // 4

    def forward():
        x = torch.randn(1, 16, *LATENT.values(), device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            transformer(hidden_states=x, timestep=torch.tensor([500.0], device="cuda"), encoder_hidden_states=embeds)

    began = time.time()
    pipe(steps=2, **call)  # warm-up: kernels, cuDNN/cuBLAS handles, allocator
    forward_s = min(cuda_time(forward) for _ in range(3))
    results = []
    baseline_s = None
    for text in args.recipes:
        acceleration = cadence.accelerate(pipe, text)
        torch.cuda.reset_peak_memory_stats()
        seconds = cuda_time(lambda: pipe(steps=args.steps, **call))
        stats = acceleration.stats()
        acceleration.remove()
        baseline_s = baseline_s or seconds
        fraction = stats.get("compute_fraction") or 1.0
        results.append({
            "recipe": text, "seconds": seconds, "per_step_ms": 1000 * seconds / args.steps,
            "speedup": baseline_s / seconds, "compute_fraction": fraction, "ideal_speedup": 1 / fraction,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        })
        print(json.dumps(results[-1]), flush=True)

    meta = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": date.today().isoformat(),
        "config": "Wan2.1-1.3B size, random weights, bf16", "tokens": tokens, "steps": args.steps,
        "cfg": True, "guidance_scale": args.guidance_scale, "one_forward_ms": 1000 * forward_s,
        "wall_s": time.time() - began,
    }
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"\n{meta['device']}, torch {meta['torch']}, {tokens} tokens, {args.steps} steps with CFG; "
          f"one forward {meta['one_forward_ms']:.0f} ms")
    print(f"{'recipe':<30} {'seconds':>8} {'ms/step':>8} {'speedup':>8} {'ideal':>6} {'achieved/ideal':>15} {'peak GiB':>9}")
    for r in results:
        print(f"{r['recipe']:<30} {r['seconds']:>8.2f} {r['per_step_ms']:>8.0f} {r['speedup']:>7.2f}x "
              f"{r['ideal_speedup']:>5.2f}x {r['speedup'] / r['ideal_speedup']:>14.0%} {r['peak_mem_gib']:>9.1f}")


if __name__ == "__main__":
    main()
