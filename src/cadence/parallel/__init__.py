"""Several GPUs for one generation: sequence (Ulysses, Ring) and CFG parallelism, with every
cadence technique on, and a patch-parallel VAE decode. ``cadence.accelerate(pipe, recipe, parallel=ParallelConfig(...))``
applies it, in processes started by ``torchrun``."""

from cadence.parallel.config import ParallelConfig
from cadence.parallel.mesh import device_for_rank, init

__all__ = ["ParallelConfig", "device_for_rank", "init", "parallelize", "start"]


def parallelize(model, config, techniques=(), vae=None):
    from cadence.parallel.apply import parallelize as apply

    return apply(model, config, techniques, vae)


def start(text: str | None, device: str) -> tuple[ParallelConfig | None, str, bool]:
    """The CLI's ``--parallel``: -> (its config, this rank's device, whether this rank writes
    the output). Without it: (None, ``device``, True)."""
    if not text:
        return None, device, True
    import torch
    import torch.distributed as dist

    config = ParallelConfig.parse(text)
    rank_device = init(device_for_rank() if torch.device(device).type == "cuda" else torch.device("cpu"))
    return config, str(rank_device), dist.get_rank() == 0
