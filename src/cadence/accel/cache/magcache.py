"""MagCache (Ma et al. 2025, "MagCache: Fast Video Generation with Magnitude-Aware Cache"):
reuse the block-stack residual while the error predicted by a calibrated magnitude curve
stays under a threshold.

The ratio ``gamma_t`` = mean over tokens of ``|r_t| / |r_t-1|`` of the residual ``r`` of
the block stack is nearly the same for every prompt of a model, so it is measured once
(``cadence calibrate --technique magcache``), per CFG branch. Reusing ``r_last`` at step
``t`` errs by about ``|1 - prod_{s=last+1..t} gamma_s|``; the distance is that error summed
over the steps since the last computed one. It depends only on the curve, the two step
indices and the config, so it needs no state and serves budget mode too.

The first ``retention_ratio`` of the steps always compute (the layout forms there). In
budget mode the distance is infinite on them, so that the pacer spends its slots there
first, but on no more than half the budget: the curve alone paces almost evenly, and on
ref-video that cost budget mode about 11 dB (benchmarks/RESULTS.md, "Default thresholds").

``forecast`` (0, 1, 2) keeps MagCache's schedule but, on a reused step, forecasts the
residual instead of reusing the last one: Newton's divided-difference polynomial through
the last ``forecast + 1`` computed residuals of the branch, evaluated at the current step
(TaylorSeer, Liu et al. 2025, "From Reusing to Forecasting"; ``taylorseer.forecast``).
0 is MagCache as published, bit for bit. Where this differs from TaylorSeer: the paper
forecasts every layer's features and computes on a fixed interval; here one residual, the
whole span's, is forecast (the engine's unit of reuse), and the computed steps are
MagCache's, unevenly spaced (consecutive in the retained first steps, 3-5 apart after),
which divided differences handle exactly. Until the branch has ``forecast + 1`` computed
residuals the forecast uses those it has (one = plain reuse). A difference TaylorSeer does
not need, on its even interval: the forecast goes no further past the last computed step
than its points span (beyond, it holds the value there), since a slope measured over the
consecutive retained steps and carried across the long gaps after them overshoots. Order
2 lost badly on ref-video (measured before that limit): its second difference is amplified
about gap-squared times (benchmarks/RESULTS.md, "Forecasting on MagCache's schedule").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from cadence.accel import calibration
from cadence.accel.cache import traces as recording
from cadence.accel.cache._base import Policy, StepPolicyConfig, install
from cadence.accel.cache.taylorseer import History
from cadence.accel.registry import Calibration, Handle, param, register
from cadence.models import find_transformer

TECHNIQUE = "magcache"


@dataclass(frozen=True)
class MagCacheConfig(StepPolicyConfig):
    name = TECHNIQUE
    summary = ("MagCache: reuse the block residual until the error accumulated along a calibrated magnitude-ratio "
               "curve reaches a threshold")

    # 0.2: the largest threshold that keeps both reference models near 35 dB at 20 steps (0.25
    # gains little work on ref-video and loses ref-image). The paper's 0.06 computes nearly every
    # step here: these models' magnitude ratios are further from 1 than Wan 2.1's.
    # Figures: benchmarks/RESULTS.md, "Default thresholds".
    threshold: float = param(0.2, "compute when the accumulated magnitude error reaches this (0 = every step)", low=0)
    max_skip: int = param(3, "at most this many consecutive reused steps", low=1)
    retention_ratio: float = param(0.2, "this first fraction of the steps always computed (the layout forms early)",
                                   low=0, high=1, high_open=True)
    calibration: str = param("", "calibration file; '' = calibration/magcache.json beside the model (cadence "
                                 "calibrate)")
    forecast: int = param(0, "on reused steps, forecast the residual from the last N+1 computed ones "
                             "(Newton order N; 0 = reuse the last one, as MagCache)", choices=(0, 1, 2))


class MagCache(Policy):
    def __init__(self, config: MagCacheConfig, ratios: dict[str, list[float]]):
        super().__init__(config)
        self.ratios = ratios
        self._curves: dict[tuple[str, int | None], list[float]] = {}

    def curve(self, branch: str, num_steps: int | None) -> list[float]:
        """gamma into steps 1..num_steps-1 for this branch (uncond falls back to cond)."""
        key = (branch, num_steps)
        if key not in self._curves:
            ratios = self.ratios.get(branch) or self.ratios["cond"]
            self._curves[key] = recording.interpolate(ratios, num_steps) if num_steps else list(ratios)
        return self._curves[key]

    def retained(self, num_steps: int | None) -> int:
        """How many first steps always compute."""
        if not num_steps:
            return 0
        fraction = self.config.retention_ratio
        if self.config.budget:
            fraction = min(fraction, self.config.budget / 2)  # leave half the slots to the curve
        return round(fraction * num_steps)

    def distance(self, state, probe, since):
        context = probe.context
        step = context.step_index
        if self.config.budget and step < self.retained(context.num_steps):
            return math.inf  # the pacer computes an infinite distance while it has slots
        gamma = self.curve(context.branch, context.num_steps)
        accumulated_ratio, accumulated_error = 1.0, 0.0
        for s in range(step - since + 1, step + 1):
            accumulated_ratio *= gamma[min(s, len(gamma)) - 1] if gamma else 1.0
            accumulated_error += abs(1.0 - accumulated_ratio)
        return accumulated_error

    def threshold(self):
        return self.config.threshold

    def must_compute(self, state, probe, since):
        return since > self.config.max_skip or probe.context.step_index < self.retained(probe.context.num_steps)

    def new_state(self):
        return History(self.config.forecast) if self.config.forecast else None

    def computed(self, state, probe, residual, encoder_residual):
        if state is not None:
            state.add(probe.context.step_index, residual, encoder_residual)

    def reuse(self, state, probe, residual, encoder_residual, since):
        if state is None or len(state.points) < 2 or any(r.shape != residual.shape for _, r, _ in state.points):
            return residual, encoder_residual
        first, last = state.points[0][0], state.points[-1][0]
        # Extrapolate no further past the last point than the points span, and hold the value
        # there: a slope taken over the consecutive retained steps and carried across the long
        # gaps after them overshoots (horizons of 0.5, 1 and 2 spans did about equally on the
        # training captions, each better than no limit).
        return state.forecast(min(probe.context.step_index, last + (last - first)), encoder_residual)


def fit(traces: list[recording.Trace]) -> dict:
    """The mean magnitude-ratio curve of each CFG branch."""
    ratios = {}
    for branch in ("cond", "uncond"):
        recorded = [t for t in traces if t.branch == branch and t.magnitude_ratio]
        if recorded:
            ratios[branch] = recording.per_step_mean(recorded, "magnitude_ratio")
    if "cond" not in ratios:
        raise ValueError("magcache: no step transitions recorded; calibrate with at least 2 steps")
    return {"ratios": ratios, "steps": len(ratios["cond"]) + 1}


def calibrate(pipe, runs, path=None, progress=None) -> Path:
    """Record ``pipe(**run)`` for each run with every forward computed, average the
    magnitude-ratio curve per branch and save it (default: beside the model). -> the file."""
    runs = list(runs)
    traces = recording.record(pipe, runs, progress=progress)
    return calibration.save(find_transformer(pipe), TECHNIQUE, {**calibration.runs_summary(runs), **fit(traces)}, path)


def describe_calibration(data: dict) -> str:
    lines = [f"magnitude-ratio curve over {data['steps']} steps"]
    for branch, ratios in data["ratios"].items():
        lines.append(f"  {branch}: " + " ".join(f"{r:.3f}" for r in ratios))
    return "\n".join(lines)


def apply(model: torch.nn.Module, config: MagCacheConfig) -> Handle:
    data = calibration.load(model, TECHNIQUE, config.calibration)
    return install(model, MagCache(config, data["ratios"]))


CALIBRATION = Calibration(TECHNIQUE, calibrate, describe_calibration)
register(MagCacheConfig, apply, CALIBRATION)

__all__ = ["MagCacheConfig", "apply", "calibrate"]
