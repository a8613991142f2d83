"""Attention sink + local window over the block sequence (StreamingLLM, Xiao et al. 2024;
the rolling KV cache of streaming video such as Self-Forcing): the first ``sink`` blocks,
which soak up attention mass, and a band around the diagonal as wide as the density
allows. ``causal`` keeps only the past side, for autoregressive use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cadence.accel.attention._base import SparseAttentionConfig, install
from cadence.accel.attention.patterns import sink_local
from cadence.accel.registry import Handle, param, register


@dataclass(frozen=True)
class SinkConfig(SparseAttentionConfig):
    name = "sparse-sink"
    summary = "attention sink + sliding window over the block sequence (streaming / causal use)"

    sink: int = param(1, "first key blocks every query block attends", low=0)
    causal: bool = param(False, "attend only to earlier blocks (and the sinks)")

    def pattern(self, geometry, density, query, key, scale):
        mask = sink_local(geometry.pattern_blocks, density, self.sink, self.causal)
        return mask[None, None].to(query.device), None


def apply(model: torch.nn.Module, config: SinkConfig) -> Handle:
    return install(model, config)


register(SinkConfig, apply)

__all__ = ["SinkConfig", "apply"]
