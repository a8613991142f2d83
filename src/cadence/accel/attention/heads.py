"""Patterns chosen per head, online: Sparse VideoGen's spatial/temporal head
classification (Xi et al. 2025) and a per-step router in the manner of VORTA (Sun et al.
2025).

On every sparse call a few query rows per head are attended exactly, and each candidate
pattern is scored by the share of their attention mass it keeps; each head takes its best
candidate. Sparse VideoGen chooses between a spatial mask (the query's own and nearest
frames) and a temporal one (the same place in every frame). The router chooses among any
of the named patterns, and with ``min_mass`` sends a head that no candidate serves well
to dense attention. VORTA learns its router; this one measures, at the cost of
``samples`` exact attention rows per head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from cadence.accel.attention._base import SparseAttentionConfig, install
from cadence.accel.attention.patterns import (
    captured_mass,
    nearest,
    radial_distance,
    spatial_distance,
    temporal_distance,
    top_blocks,
    window_distance,
)
from cadence.accel.registry import Handle, param, register

_STATIC = {
    "window": window_distance,
    "radial": radial_distance,
    "spatial": spatial_distance,
    "temporal": temporal_distance,
}
CANDIDATES = (*_STATIC, "topk")


def candidate(name, geometry, density, query, key, scale) -> torch.Tensor:
    """(1 or B, 1 or H, blocks, blocks) bool."""
    if name == "topk":
        return top_blocks(query, key, geometry.block, density, scale=scale)
    distance = _STATIC[name]

    def build():  # once per geometry, density and device: no host-to-device copy per call
        return nearest(distance(geometry.centers), density)[None, None].to(query.device)

    return geometry.memo((name, density, query.device), build)


def route(names, geometry, density, query, key, scale, samples, min_mass=0.0):
    """Each head's best candidate by kept attention mass -> (mask (B, H, blocks, blocks),
    choice (B, H) index into ``names``, len(names) meaning dense)."""
    batch, heads = query.shape[:2]
    blocks = geometry.pattern_blocks
    masks = torch.stack([
        candidate(name, geometry, density, query, key, scale).expand(batch, heads, blocks, blocks) for name in names
    ])  # (C, B, H, blocks, blocks)
    mass = captured_mass(query, key, masks, geometry.block, samples, scale)  # (C, B, H)
    best, choice = mass.max(0)
    mask = masks.gather(0, choice[None, :, :, None, None].expand(1, batch, heads, blocks, blocks))[0]
    dense = best < min_mass
    mask = mask | dense[:, :, None, None]
    return mask, torch.where(dense, len(names), choice)


@dataclass(frozen=True)
class SparseVideoGenConfig(SparseAttentionConfig):
    name = "sparse-svg"
    summary = "Sparse VideoGen: each head, each call, spatial (nearby frames) or temporal (same place, all frames)"
    static: ClassVar[bool] = False
    choices: ClassVar[tuple[str, ...]] = ("spatial", "temporal")

    samples: int = param(64, "query rows per head attended exactly to classify it", low=1)

    def pattern(self, geometry, density, query, key, scale):
        return route(self.choices, geometry, density, query, key, scale, self.samples)


@dataclass(frozen=True)
class RouterConfig(SparseAttentionConfig):
    name = "sparse-router"
    summary = "per-step, per-head router (VORTA-style): the candidate pattern that keeps most attention mass"
    static: ClassVar[bool] = False

    candidates: str = param("window,temporal,topk", f"comma-separated patterns to route among: {', '.join(CANDIDATES)}")
    samples: int = param(64, "query rows per head attended exactly to route it", low=1)
    min_mass: float = param(0.0, "a head whose best candidate keeps less attention mass than this runs dense",
                            low=0, high=1)

    def validate(self):
        super().validate()
        names = self.names
        unknown = [name for name in names if name not in CANDIDATES]
        self.require(names and not unknown, f"candidates={self.candidates!r} names {', '.join(unknown) or 'nothing'}; "
                                            f"valid: {', '.join(CANDIDATES)}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.candidates.split(",") if name.strip())

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        return (*self.names, "dense")

    def pattern(self, geometry, density, query, key, scale):
        return route(self.names, geometry, density, query, key, scale, self.samples, self.min_mass)


def apply(model: torch.nn.Module, config: SparseAttentionConfig) -> Handle:
    return install(model, config)


register(SparseVideoGenConfig, apply)
register(RouterConfig, apply)

__all__ = ["RouterConfig", "SparseVideoGenConfig", "apply"]
