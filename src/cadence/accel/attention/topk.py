"""Dynamic block selection from pooled scores (SpargeAttn, Zhang et al. 2025; XAttention,
Xu et al. 2025): mean-pool Q and K over each block, score every block pair, and keep per
query block the key blocks that hold the most estimated attention mass, until ``mass``
of it is covered or the density budget is spent. The diagonal is always kept. The mask
follows the content, so it is rebuilt on every call (a few block-level matmuls), or with
``mask_every=N`` once every N steps per layer and CFG branch, reused in between; with
``mask_drift=d`` too, a held mask is rebuilt early once the layer's block-pooled queries or
keys moved by more than ``d`` (relative L2) since it was built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from cadence.accel.attention._base import SparseAttentionConfig, install
from cadence.accel.attention.patterns import top_blocks
from cadence.accel.registry import Handle, param, register


@dataclass(frozen=True)
class TopKConfig(SparseAttentionConfig):
    name = "sparse-topk"
    summary = "top-k key blocks per query block from mean-pooled Q·K scores (SpargeAttn / XAttention)"
    static: ClassVar[bool] = False

    mass: float = param(0.0, "stop once this share of the estimated attention mass is kept; 0 = use the whole density",
                        low=0, high=1, high_open=True)

    def pattern(self, geometry, density, query, key, scale):
        return top_blocks(query, key, geometry.block, density, self.mass, scale), None


def apply(model: torch.nn.Module, config: TopKConfig) -> Handle:
    return install(model, config)


register(TopKConfig, apply)

__all__ = ["TopKConfig", "apply"]
