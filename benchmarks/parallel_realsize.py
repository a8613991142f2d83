"""Several GPUs at the real size: a Wan2.1-1.3B- or 14B-size WanTransformer3DModel (random
weights, bf16) at 480p x 81 frames (latents 16 x 21 x 60 x 104, 32,760 tokens), steps with
CFG through cadence's pipeline path (RefVideoPipeline with precomputed text embeddings,
as wan_realsize.py), unaccelerated and with Wan's default recipe, on the GPUs torchrun
starts. One GPU runs the plain model; several run CFG parallelism (cfg=2) with Ulysses over
the rest (ulysses = GPUs / 2), or --parallel. Timed with CUDA events after a warm-up.

    torchrun --nproc-per-node 1 benchmarks/parallel_realsize.py --size 14b --out $OUT/parallel-1.json
    torchrun --nproc-per-node 2 benchmarks/parallel_realsize.py --size 14b --reference $OUT/parallel-1.json \
        --out $OUT/parallel-2.json

``--reference`` names the one-GPU run's file: each recipe's speedup over the one-GPU
baseline, and over the same recipe on one GPU, whose ratio to the GPU count is the
efficiency. Run both in one call on one machine, so the
ratio is measured in one run. ``--tiny`` runs the same code on the CPU (gloo) at a 2-block
config, 4 steps, compile on aot_eager: the CPU test of this script.

MagCache needs a calibration: rank 0 fits one on a short unaccelerated run (random weights,
so the curve only places the budget's computed steps; the cost at a fixed budget does not
depend on it), the other ranks wait for it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import date

import torch
import torch.distributed as dist
from diffusers import WanTransformer3DModel
from wan_realsize import (
    LATENT,
    TEXT_TOKENS,
    WAN_1_3B,
    calibrate,
    cast_like_from_pretrained,
    cuda_time,
)

import cadence
from cadence.models.defaults import VIDEO_RECIPE
from cadence.parallel import ParallelConfig, device_for_rank, init
from cadence.reference.models import reference_model
from cadence.reference.pipelines import RefVideoPipeline

# Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json (as families_realsize.py)
WAN_14B = {**WAN_1_3B, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}
SIZES = {"1.3b": WAN_1_3B, "14b": WAN_14B}
TINY = dict(WAN_1_3B, num_attention_heads=4, attention_head_dim=64, text_dim=32, freq_dim=32, ffn_dim=64,
            num_layers=2, rope_max_seq_len=64)
TINY_LATENT = dict(frames=2, height=8, width=8)


def default_parallel(world: int) -> ParallelConfig | None:
    """One GPU: none. Several: the two CFG branches on two halves, Ulysses inside each."""
    if world == 1:
        return None
    if world % 2:
        return ParallelConfig(ulysses=world)
    return ParallelConfig(ulysses=world // 2, cfg=2)


class Clock:
    """CUDA events on a GPU, the host clock on the CPU (--tiny)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def time(self, fn) -> float:
        if not self.cuda:
            began = time.perf_counter()
            fn()
            return time.perf_counter() - began
        return cuda_time(fn)


def build(args, device: torch.device):
    config, dtype = (TINY, torch.float32) if args.tiny else (SIZES[args.size], torch.bfloat16)
    torch.manual_seed(0)  # the same random weights on every rank
    with torch.device(device):
        transformer = cast_like_from_pretrained(WanTransformer3DModel(**config), dtype).eval()
    pipe = RefVideoPipeline(transformer=transformer, scheduler=reference_model("ref-video").scheduler())
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(1)
    tokens = 16 if args.tiny else TEXT_TOKENS
    embeds, negative = (torch.randn(1, tokens, config["text_dim"], generator=generator).to(device, dtype)
                        for _ in range(2))
    latent = TINY_LATENT if args.tiny else LATENT
    call = dict(prompt_embeds=embeds, negative_prompt_embeds=negative, guidance_scale=args.guidance_scale, **latent)
    return pipe, call, latent["frames"] * latent["height"] * latent["width"] // 4


def calibrations(pipe, call, args, rank: int) -> dict[str, str]:
    """MagCache's calibration, fitted once on rank 0 and read by every rank; a later run in the
    same call (the other GPU count) reads the one already fitted for its size."""
    folder = f"{args.calibration_dir}/{args.size if not args.tiny else 'tiny'}-{args.calibration_steps}"
    if rank == 0 and not os.path.isfile(f"{folder}/magcache.json"):
        calibrate(pipe, call, args.calibration_steps, {"magcache"}, folder)
    if dist.is_initialized():
        dist.barrier()
    return {"magcache": f"{folder}/magcache.json"}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="14b")
    parser.add_argument("--steps", type=int, default=10, help="timed steps with CFG; per-step time is the figure")
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--parallel", default=None, help="ulysses=N, ring=N, cfg=2 (default: cfg=2 and Ulysses over "
                                                         "the rest; none on one GPU)")
    parser.add_argument("--recipes", nargs="+", default=["baseline", VIDEO_RECIPE])
    parser.add_argument("--calibration-steps", type=int, default=8)
    parser.add_argument("--calibration-dir", default="/tmp/cadence-calibration-parallel")
    parser.add_argument("--reference", default=None, help="the one-GPU run's JSON: speedup and efficiency against it")
    parser.add_argument("--tiny", action="store_true", help="the same code on the CPU (gloo), 2 blocks, 4 steps")
    parser.add_argument("--out", default="parallel_realsize.json")
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 64

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cpu") if args.tiny else device_for_rank()
    if world > 1:
        init(device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    parallel = ParallelConfig.parse(args.parallel) if args.parallel else default_parallel(world)
    steps = 4 if args.tiny else args.steps  # 4: budget 0.3 allows a computed step from 4 on
    recipes = [r.replace("compile", "compile(backend='aot_eager')") if args.tiny else r for r in args.recipes]

    began = time.time()
    pipe, call, tokens = build(args, device)
    clock = Clock(device)
    paths = calibrations(pipe, call, args, rank) if any("magcache" in r for r in recipes) else {}
    reference = None
    if args.reference:
        with open(args.reference) as f:
            reference = json.load(f)
    results = []
    for recipe in recipes:
        text = recipe.replace("magcache(", f"magcache(calibration='{paths['magcache']}', ") if paths else recipe
        with cadence.accelerate(pipe, text, parallel=parallel) as acceleration:
            pipe(steps=4, **call)  # warm-up: compile, autotune, NCCL communicators; 4: budget 0.3 needs 4 steps
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            if dist.is_initialized():
                dist.barrier()  # every rank starts the timed run together
            seconds = clock.time(lambda: pipe(steps=steps, **call))
            stats = acceleration.stats()
        result = {"recipe": recipe, "gpus": world, "parallel": str(parallel or "none"), "seconds": seconds,
                  "per_step_ms": 1000 * seconds / steps, "compute_fraction": stats.get("compute_fraction"),
                  "schedule": stats.get("schedule")}
        if device.type == "cuda":
            result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if reference is not None:
            one_gpu = {r["recipe"]: r["per_step_ms"] for r in reference["results"]}
            # over the one-GPU baseline: what a user gains; over the same recipe on one GPU:
            # what the GPUs add, whose share of the ideal (the GPU count) is the efficiency
            result["speedup_over_one_gpu_baseline"] = one_gpu["baseline"] / result["per_step_ms"]
            if recipe in one_gpu:
                result["speedup_over_one_gpu_same_recipe"] = one_gpu[recipe] / result["per_step_ms"]
                result["efficiency"] = result["speedup_over_one_gpu_same_recipe"] / world
        results.append(result)
        if rank == 0:
            print(json.dumps(result), flush=True)
    if rank == 0:
        meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "gpus": world,
                "torch": torch.__version__, "date": date.today().isoformat(),
                "config": f"Wan2.1-{args.size.upper()} size, random weights, bf16" if not args.tiny else "tiny, cpu",
                "tokens": tokens, "steps": steps, "cfg": True, "guidance_scale": args.guidance_scale,
                "reference": args.reference, "wall_s": time.time() - began}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
