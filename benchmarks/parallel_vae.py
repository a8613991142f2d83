"""Patch-parallel VAE decode (cadence/parallel/vae.py) against the one-process decode: a
random-weight AutoencoderKLWan at Wan2.1's config (diffusers' defaults), bf16, decoding a
480p x 81-frame latent (16 x 21 x 60 x 104), on the GPUs torchrun starts. Rank 0 first
decodes alone (the others wait): the one-process time and the reference video. Then every
rank decodes its band, for each --halos value: the time (the slowest rank's), the speedup,
and the PSNR and max |difference| of the gathered video against the reference. Timed with
CUDA events after a warm-up decode; results to --out (JSON) from rank 0.

    torchrun --nproc-per-node 2 benchmarks/parallel_vae.py --out $OUT/parallel-vae-2.json
    torchrun --nproc-per-node 4 benchmarks/parallel_vae.py --out $OUT/parallel-vae-4.json

``--size moderate`` is Wan2.1's architecture at a third of its channels in float32, for a
CPU check of the seam error at the real depth; ``--tiny`` is a tiny config on the CPU
(gloo): the check that this script runs.

    torchrun --nproc-per-node 2 benchmarks/parallel_vae.py --tiny --out /tmp/parallel-vae-tiny.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from datetime import date

import torch
import torch.distributed as dist
from diffusers import AutoencoderKLWan

from cadence.bench.metrics import psnr
from cadence.parallel import device_for_rank, init
from cadence.parallel import vae as vae_bands

# (vae config, latent (z_dim, frames, height, width), dtype)
SIZES = {
    "wan2.1": ({}, (16, 21, 60, 104), torch.bfloat16),  # diffusers' defaults are Wan2.1's VAE
    "moderate": ({"base_dim": 32}, (16, 3, 40, 16), torch.float32),
    "tiny": ({"base_dim": 8, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1}, (16, 3, 32, 8), torch.float32),
}


def timed(fn, device: torch.device) -> tuple[torch.Tensor, float]:
    if device.type != "cuda":
        start = time.perf_counter()
        return fn(), time.perf_counter() - start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    torch.cuda.synchronize()
    return out, start.elapsed_time(end) / 1000


def psnr_db(got: torch.Tensor, expected: torch.Tensor) -> float | None:
    """dB over the decoder's [-1, 1] range; None where the two are equal (JSON has no inf)."""
    value = psnr(got, expected)
    return None if math.isinf(value) else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="wan2.1")
    parser.add_argument("--tiny", action="store_true", help="--size tiny on the CPU")
    parser.add_argument("--halos", default="2,4,8,15", help="latent rows of context per inner band edge")
    parser.add_argument("--out", default="parallel_vae.json")
    args = parser.parse_args()
    size = "tiny" if args.tiny else args.size
    config, latent_shape, dtype = SIZES[size]
    device = device_for_rank() if size == "wan2.1" else torch.device("cpu")
    if size != "wan2.1":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("WORLD_SIZE", "1"))))
    init(device)
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # the same weights and latent on every rank
    vae = AutoencoderKLWan(**config).to(device, dtype).eval()
    z = torch.randn(1, *latent_shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)

    def decode():
        with torch.no_grad():
            return vae.decode(z, return_dict=False)[0]

    reference, one_process = None, None
    if rank == 0:
        decode()  # warm-up
        reference, one_process = timed(decode, device)
    dist.barrier()
    result = {"date": str(date.today()), "size": size, "latent": list(latent_shape), "dtype": str(dtype),
              "world": world, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "one_process_s": one_process, "exact_halo": vae_bands.exact_halo(vae), "bands": {}}
    halos = [int(halo) for halo in args.halos.split(",")] if world > 1 else []  # one process: its time alone
    for halo in halos:
        bands = vae_bands.apply(vae, halo=halo)
        decode()  # warm-up
        video, seconds = timed(decode, device)
        bands.remove()
        slowest = torch.tensor([seconds], dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        if rank == 0:
            entry = {"seconds": float(slowest), "speedup": one_process / float(slowest),
                     "rows_per_rank": max(min(end + halo, latent_shape[2]) - max(start - halo, 0)
                                          for start, end in vae_bands.band_bounds(latent_shape[2], world)),
                     "psnr_db": psnr_db(video, reference),
                     "max_abs_diff": (video.float() - reference.float()).abs().max().item()}
            result["bands"][halo] = entry
            print(f"halo={halo}: {entry}", flush=True)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"one process: {one_process:.3f} s -> {args.out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
