"""A tiny random Wan VAE decoded once in one process and once in bands over two gloo
processes on the CPU; ``test_vae_parallel.py`` compares them."""

from __future__ import annotations

import os
import traceback
from datetime import timedelta

import torch

# (z_dim, frames, height, width): 3 latent frames decode to 9; 32 rows so that two bands with
# the exact halo still leave rows neither rank decodes
LATENT = (16, 3, 32, 4)
# The tiny decoder's reach after the mid-block attention, in latent rows (parallel/vae.py
# counts Wan 2.1's the same way): mid residual block 2, up block 0's two residual blocks 4
# + its resample 0.5, then 2 + 0.25 at 2x, 1 + 0.125 at 4x, 0.5 at 8x, conv_out 0.125 = 10.5
EXACT_HALO_TINY = 11
HALOS = (1, 4)  # the exact halo runs through parallelize(vae=1)


def tiny_vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=8, z_dim=LATENT[0], dim_mult=[1, 2, 2, 2], num_res_blocks=1).eval()


def latent() -> torch.Tensor:
    return torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(1))


def decode(vae, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(z, return_dict=False)[0]


def worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank: the banded decode at each halo, through ``parallelize`` with vae=1, the
    refusals that must come before any collective, then the VAE after remove()."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from cadence.parallel import ParallelConfig, init, parallelize
    from cadence.parallel import vae as vae_bands

    init(torch.device("cpu"), timeout=timedelta(seconds=60))
    singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    results: dict = {}
    try:
        vae, z = tiny_vae(), latent()
        for halo in HALOS:
            bands = vae_bands.apply(vae, halo=halo)
            results[f"halo={halo}"] = decode(vae, z)
            bands.remove()
        from conftest import tiny_wan

        with_cfg = parallelize(tiny_wan(), ParallelConfig(cfg=2, vae=True, vae_halo=EXACT_HALO_TINY), vae=vae)
        results["parallelize"] = decode(vae, z)
        try:
            decode(vae, z[..., :1, :])
        except ValueError as error:
            results["one-row"] = str(error)
        with_cfg.remove()
        results["world-1"] = vae_bands.apply(vae, group=singles[rank], halo=2)
        results["removed"] = decode(vae, z)
        results["removed-attributes"] = sorted(name for name in vars(vae) if name == "_decode")
    except Exception:  # noqa: BLE001 - whatever failed, the parent reports it with its traceback
        results["error"] = traceback.format_exc()
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def run_both(out: str, world: int = 2) -> tuple[list[dict], torch.Tensor]:
    """-> (each rank's results, the one-process decode), the latter computed here while the
    ranks run."""
    import torch.multiprocessing as mp
    from parallel.parallel_scenarios import free_port

    ranks = mp.spawn(worker, args=(world, free_port(), out), nprocs=world, join=False)
    single = decode(tiny_vae(), latent())
    while not ranks.join():
        pass
    return [torch.load(os.path.join(out, f"rank{rank}.pt"), weights_only=False) for rank in range(world)], single
