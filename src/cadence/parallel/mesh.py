"""The process group and the device mesh of a parallel generation.

Under ``torchrun`` every process reads its rank from the environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT); ``init`` starts the process group on NCCL where there is a
GPU and on Gloo otherwise (the CPU tests). The mesh is (cfg, ring, ulysses): consecutive
ranks share a forward's tokens, so on one host the all-to-all of Ulysses stays between
neighbouring GPUs, and the two CFG halves exchange one output per step.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from cadence.parallel.config import ParallelConfig

MESH_DIMS = ("cfg", "ring", "ulysses")


def device_for_rank() -> torch.device:
    """This process's device: its local GPU under torchrun, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init(device: torch.device | None = None, timeout: timedelta | None = None) -> torch.device:
    """Start the process group if it is not running (from torchrun's environment); returns
    this rank's device. ``timeout``: how long a collective waits for a missing rank."""
    device = device or device_for_rank()
    if not dist.is_initialized():
        missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise ValueError(f"--parallel needs one process per rank, started by torchrun (missing {', '.join(missing)}"
                             "); e.g. torchrun --nproc-per-node 2 -m cadence.cli generate ... --parallel 'ulysses=2'")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda"
                                else None, timeout=timeout)
    return device


def build_mesh(config: ParallelConfig, device: torch.device) -> DeviceMesh:
    if not dist.is_initialized():
        raise ValueError(f"parallel {config}: torch.distributed is not initialised; launch with torchrun (or call "
                         "cadence.parallel.init() in each process)")
    world = dist.get_world_size()
    if world != config.world:
        raise ValueError(f"parallel {config} needs ulysses x ring x cfg = {config.world} processes, but "
                         f"{world} are running; launch torchrun --nproc-per-node {config.world}, or choose degrees "
                         f"whose product is {world}")
    return init_device_mesh(device.type, (config.cfg, config.ring, config.ulysses), mesh_dim_names=MESH_DIMS)
