"""Static local patterns for video: 3D windows (Sliding Tile Attention, Zhang et al. 2025)
and their radial, distance-decaying variant (Radial Attention, Li et al. 2025).

Both keep, for each query block, the ``density`` share of key blocks nearest to it under
a distance in frames x height x width; the mask depends only on the layout, so it is
built once and reused by every layer and step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cadence.accel.attention._base import SparseAttentionConfig, install
from cadence.accel.attention.patterns import nearest, radial_distance, window_distance
from cadence.accel.registry import Handle, param, register


@dataclass(frozen=True)
class WindowConfig(SparseAttentionConfig):
    name = "sparse-window"
    summary = "3D local window (Sliding Tile Attention): each block attends its nearest blocks in frames x height x width"

    time_scale: float = param(1.0, "how many tokens of spatial distance one latent frame counts as; larger = flatter "
                                   "window", low=0, low_open=True)

    def pattern(self, geometry, density, query, key, scale):
        distance = window_distance(geometry.centers, self.time_scale)
        return nearest(distance, density)[None, None].to(query.device), None


@dataclass(frozen=True)
class RadialConfig(SparseAttentionConfig):
    name = "sparse-radial"
    summary = "Radial Attention: the spatial window halves each time the frame distance doubles"

    def pattern(self, geometry, density, query, key, scale):
        return nearest(radial_distance(geometry.centers), density)[None, None].to(query.device), None


def apply(model: torch.nn.Module, config: SparseAttentionConfig) -> Handle:
    return install(model, config)


register(WindowConfig, apply)
register(RadialConfig, apply)

__all__ = ["RadialConfig", "WindowConfig", "apply"]
