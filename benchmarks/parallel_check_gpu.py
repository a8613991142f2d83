"""Parallel generation on GPUs equals the one-process generation: ref-video (bf16, its trained
size, 50 steps with CFG) under Ring, Ulysses and CFG parallelism, alone and with Wan's default
recipe compiled by inductor, each against the same recipe in one process on the same GPU.

The CPU tests (tests/parallel, gloo) cover every technique family but cannot run Ring (it needs
attention that returns its log-sum-exp: diffusers' cuDNN backend) nor inductor's kernels. Here
both run. In bf16 a sequence split changes the order of sums, so the outputs differ in the last
bits; the figure is PSNR against one process over the frames' [-1, 1] range (cadence.bench.metrics.psnr,
as everywhere in RESULTS.md; inf where bit-identical).

    torchrun --nproc-per-node 2 benchmarks/parallel_check_gpu.py --out $OUT/parallel_check_gpu.json
"""

from __future__ import annotations

import argparse
import json
from datetime import date

import torch
import torch.distributed as dist
from wan_realsize import cast_like_from_pretrained

import cadence
from cadence.bench.metrics import psnr
from cadence.loading import load_reference
from cadence.models.defaults import VIDEO_RECIPE
from cadence.parallel import ParallelConfig, init

CHECKS = (
    ("baseline", "ring=2"),
    ("baseline", "ulysses=2"),
    ("baseline", "cfg=2"),
    (VIDEO_RECIPE, "ulysses=2"),
    (VIDEO_RECIPE, "cfg=2"),
    ("magcache(budget=0.3)", "ring=2"),
)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default="parallel_check_gpu.json")
    parser.add_argument("--tiny", action="store_true", help="a CPU dry run (gloo): float32, 4 steps, compile on "
                                                            "aot_eager, no Ring (it needs a GPU)")
    args = parser.parse_args()
    device = init()
    rank = dist.get_rank()
    checks = CHECKS
    dtype = torch.bfloat16
    if args.tiny:
        args.steps, dtype = 4, torch.float32
        checks = [(r.replace("compile", "compile(backend='aot_eager')"), p) for r, p in CHECKS if "ring" not in p]
    pipe = load_reference("ref-video", text_encoder=False)
    pipe.transformer = cast_like_from_pretrained(pipe.transformer, dtype)  # keeps Wan's float32 modules
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    call = {name: torch.randn(1, 8, 384, generator=generator).to(device, dtype)
            for name in ("prompt_embeds", "negative_prompt_embeds")}

    def generate() -> torch.Tensor:
        return pipe(steps=args.steps, guidance_scale=4.0, seed=0, **call).frames[0]

    rows, singles, single_stats = [], {}, {}
    for recipe, parallel in checks:
        if recipe not in singles:  # the same recipe in this process alone, on this rank's GPU
            with cadence.accelerate(pipe, recipe) as acceleration:
                singles[recipe] = generate()
                single_stats[recipe] = acceleration.stats()
        with cadence.accelerate(pipe, recipe, parallel=ParallelConfig.parse(parallel)) as acceleration:
            output = generate()
            stats = acceleration.stats()
        row = {"recipe": recipe, "parallel": parallel, "psnr_db": psnr(output, singles[recipe]),
               "max_abs_diff": (output.float() - singles[recipe].float()).abs().max().item(),
               "compute_fraction": stats.get("compute_fraction"),
               "compute_fraction_one_process": single_stats[recipe].get("compute_fraction")}
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
    removed = generate()  # after every remove(): the one-process model
    if rank == 0:
        meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "gpus": dist.get_world_size(), "torch": torch.__version__,
                "date": date.today().isoformat(), "model": f"ref-video, {dtype}", "steps": args.steps,
                "removed_equals_baseline": bool(torch.equal(removed, singles["baseline"]))}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
