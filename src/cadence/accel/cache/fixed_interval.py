"""Fixed-interval step reuse (FORA, Selvaraju et al. 2024): compute the block stack every
``interval``-th denoising step and reuse its residual on the steps between.

The simplest caching policy and the reference point for the adaptive ones: its compute
fraction is known before the run, so its ideal speedup is too. In budget mode it spaces
the allowed computed steps evenly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cadence.accel.cache._base import Policy, StepPolicyConfig, install
from cadence.accel.registry import Handle, param, register


@dataclass(frozen=True)
class FixedIntervalConfig(StepPolicyConfig):
    name = "fixed-interval"
    summary = "FORA-style reuse: recompute the transformer blocks every N-th step, reuse their residual between"

    interval: int = param(2, "compute every N-th step (1 = every step, no reuse)", low=1)
    cooldown: int = param(0, "last steps always computed (fine detail forms late)", low=0)

    def computes(self, step_index: int, num_steps: int | None) -> bool:
        if step_index < self.warmup:
            return True
        if num_steps is not None and step_index >= num_steps - self.cooldown:
            return True
        return (step_index - self.warmup) % self.interval == 0

    def expected_fraction(self, num_steps: int) -> float:
        """Fraction of steps computed over a whole run: the ideal speedup is its inverse."""
        return sum(self.computes(i, num_steps) for i in range(num_steps)) / num_steps


class FixedInterval(Policy):
    def distance(self, state, probe, since):
        if self.config.budget:
            return float(since)  # paced: evenly spaced
        return 1.0 if self.config.computes(probe.context.step_index, probe.context.num_steps) else 0.0

    def threshold(self):
        return 1.0


def apply(model: torch.nn.Module, config: FixedIntervalConfig) -> Handle:
    return install(model, FixedInterval(config))


register(FixedIntervalConfig, apply)

__all__ = ["FixedIntervalConfig", "apply"]
