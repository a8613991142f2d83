"""TaylorSeer (Liu et al. 2025, "From Reusing to Forecasting"): on the steps between
computed ones, forecast the block stack's residual from its last computed values instead
of reusing the last one as is.

The paper expands each feature in a Taylor series whose derivatives are finite
differences of the cached features. With computed steps ``t_0 < ... < t_m`` (m = order)
this is Newton's divided-difference polynomial through them, evaluated at the current
step; on evenly spaced steps it equals the paper's expansion, and it stays exact when
budget mode spaces the computed steps unevenly. Until ``order + 1`` steps are computed the
forecast uses the points it has (order 0 = plain reuse).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cadence.accel.cache._base import Policy, StepPolicyConfig, install
from cadence.accel.registry import Handle, param, register


@dataclass(frozen=True)
class TaylorSeerConfig(StepPolicyConfig):
    name = "taylorseer"
    summary = "TaylorSeer: compute every N-th step, forecast the residual between by a Taylor expansion"

    interval: int = param(3, "compute every N-th step", low=1)
    order: int = param(1, "Taylor order of the forecast, 0 (plain reuse) to 2", choices=(0, 1, 2))


def divided_differences(points: list[tuple[int, torch.Tensor]]) -> list[torch.Tensor]:
    """Newton coefficients [f[t_m], f[t_m, t_m-1], ...] of points [(t, f(t)), ...] in
    time order, newest last, in float32."""
    steps = [t for t, _ in points][::-1]  # newest first
    table = [f.float() for _, f in points][::-1]
    coefficients = [table[0]]
    for level in range(1, len(points)):
        table = [(table[i] - table[i + 1]) / (steps[i] - steps[i + level]) for i in range(len(table) - 1)]
        coefficients.append(table[0])
    return coefficients


def forecast(points: list[tuple[int, torch.Tensor]], step: int) -> torch.Tensor:
    steps = [t for t, _ in points][::-1]
    result, product = None, 1.0
    for level, coefficient in enumerate(divided_differences(points)):
        term = coefficient * product
        result = term if result is None else result + term
        product *= step - steps[level]
    return result.to(points[-1][1].dtype)


@dataclass
class History:
    """A branch's last ``order + 1`` computed residuals (step, residual, encoder residual), and
    their forecast at a later step (shared with MagCache's ``forecast``)."""

    order: int
    points: list[tuple[int, torch.Tensor, torch.Tensor | None]] = field(default_factory=list)

    def add(self, step: int, residual: torch.Tensor, encoder_residual: torch.Tensor | None) -> None:
        self.points.append((step, residual, encoder_residual))
        del self.points[: -(self.order + 1)]

    def forecast(self, step: int, encoder_residual: torch.Tensor | None):
        """(residual, encoder residual) at ``step``; the encoder one forecast where every point has one."""
        hidden = forecast([(t, r) for t, r, _ in self.points], step)
        if encoder_residual is not None and all(e is not None for _, _, e in self.points):
            encoder_residual = forecast([(t, e) for t, _, e in self.points], step)
        return hidden, encoder_residual


class TaylorSeer(Policy):
    def new_state(self):
        return History(self.config.order)

    def distance(self, state, probe, since):
        return float(since)

    def threshold(self):
        return float(self.config.interval)

    def computed(self, state, probe, residual, encoder_residual):
        state.add(probe.context.step_index, residual, encoder_residual)

    def reuse(self, state, probe, residual, encoder_residual, since):
        return state.forecast(probe.context.step_index, encoder_residual)


def apply(model: torch.nn.Module, config: TaylorSeerConfig) -> Handle:
    return install(model, TaylorSeer(config))


register(TaylorSeerConfig, apply)
