"""The dense attention backend, chosen by cadence for the model's self- and joint
attention: torch's SDPA backends (cuDNN, flash, memory-efficient, math) or FlexAttention.
On an H100 at Wan2.1-1.3B's 32,760 tokens cuDNN takes 11.6 ms per layer call and flash
18.3 ms (DESIGN.md), so which one runs matters as much as many sparse patterns do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cadence.accel.attention._base import AttentionConfig, install
from cadence.accel.attention.kernels import DENSE_BACKENDS
from cadence.accel.registry import Handle, register


@dataclass(frozen=True)
class AttentionBackendConfig(AttentionConfig):
    name = "attention-backend"
    summary = "dense attention on a chosen backend (cuDNN, flash, efficient, math, FlexAttention)"

    backend: str = field(default="cudnn", metadata={"help": f"one of {', '.join(DENSE_BACKENDS)}"})

    def validate(self):
        if self.backend not in DENSE_BACKENDS:
            raise ValueError(f"{self.name}: backend={self.backend!r}; valid: {', '.join(DENSE_BACKENDS)}")

    @property
    def dense_backend(self) -> str:
        return self.backend


def apply(model: torch.nn.Module, config: AttentionBackendConfig) -> Handle:
    return install(model, config)


register(AttentionBackendConfig, apply)

__all__ = ["AttentionBackendConfig", "apply"]
