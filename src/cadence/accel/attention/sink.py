"""Attention sink + local window over the block sequence (StreamingLLM, Xiao et al. 2024;
the rolling KV cache of streaming video such as Self-Forcing): the first ``sink`` blocks,
which soak up attention mass, and a band around the diagonal as wide as the density
allows. ``causal`` keeps only the past side, for autoregressive use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cadence.accel.attention._base import SparseAttentionConfig, install
from cadence.accel.attention.patterns import sink_local
from cadence.accel.registry import Handle, register


@dataclass(frozen=True)
class SinkConfig(SparseAttentionConfig):
    name = "sparse-sink"
    summary = "attention sink + sliding window over the block sequence (streaming / causal use)"

    sink: int = field(default=1, metadata={"help": "first key blocks every query block attends (>= 0)"})
    causal: bool = field(default=False, metadata={"help": "attend only to earlier blocks (and the sinks)"})

    def validate(self):
        if self.sink < 0:
            raise ValueError(f"{self.name}: sink={self.sink} must be >= 0")

    def pattern(self, geometry, density, query, key, scale):
        mask = sink_local(geometry.pattern_blocks, density, self.sink, self.causal)
        return mask[None, None].to(query.device), None


def apply(model: torch.nn.Module, config: SinkConfig) -> Handle:
    return install(model, config)


register(SinkConfig, apply)

__all__ = ["SinkConfig", "apply"]
