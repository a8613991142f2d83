"""The dense attention backend, chosen by cadence for the model's self- and joint
attention: torch's SDPA backends (cuDNN, flash, memory-efficient, math) or FlexAttention.
At Wan2.1-1.3B's 32,760 tokens cuDNN is markedly faster than flash on Hopper (DESIGN.md's
measured ceilings), so which one runs matters as much as many sparse patterns do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cadence.accel.attention._base import AttentionConfig, install
from cadence.accel.attention.kernels import DENSE_BACKENDS
from cadence.accel.registry import Handle, param, register


@dataclass(frozen=True)
class AttentionBackendConfig(AttentionConfig):
    name = "attention-backend"
    summary = "dense attention on a chosen backend (cuDNN, flash, efficient, math, FlexAttention)"

    backend: str = param("cudnn", "the dense attention kernel", choices=tuple(DENSE_BACKENDS))

    @property
    def dense_backend(self) -> str:
        return self.backend


def apply(model: torch.nn.Module, config: AttentionBackendConfig) -> Handle:
    """On a model with a streaming KV cache the term goes beneath the cache's stand-ins, whose call
    over [cache, chunk] then runs this backend (:mod:`cadence.accel.sequence.backend`)."""
    from cadence.accel.sequence._base import beneath_cache

    handle = beneath_cache(model, lambda: install(model, config))
    return Handle(config, lambda: beneath_cache(model, handle.remove), handle.stats)


register(AttentionBackendConfig, apply)

__all__ = ["AttentionBackendConfig", "apply"]
