"""TeaCache (Liu et al. 2024, "Timestep Embedding Tells: It's Time to Cache"): reuse the
block-stack residual while the accumulated, rescaled change of the first block's
timestep-modulated input stays under a threshold.

Per CFG branch, every forward adds ``poly(rel_l1(modulated_t, modulated_t-1))`` to an
accumulator; the polynomial maps the change of the modulated input (cheap: one norm and
one modulation) to the change of the model output it predicts, fitted offline per model
(``cadence calibrate --technique teacache``). The distance is the accumulator since the
last computed forward; a computed forward resets it to zero. The first and last steps
always compute.

The calibration (``fit``) leaves out the transition into the last step, and beyond the
calibrated range of input changes the polynomial is continued linearly (``Rescaler``):
both guard against a degree-4 fit that goes wrong where it has no data that matters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cadence.accel import calibration
from cadence.accel.cache import traces as recording
from cadence.accel.cache._base import Policy, StepPolicyConfig, install
from cadence.accel.registry import Calibration, Handle, param, register
from cadence.models import find_transformer

DEGREE = 4  # as the paper's published coefficients
TECHNIQUE = "teacache"


@dataclass(frozen=True)
class TeaCacheConfig(StepPolicyConfig):
    name = TECHNIQUE
    summary = ("TeaCache: reuse the block residual until the accumulated, calibrated change of the timestep-modulated "
               "input reaches a threshold")

    # 0.06: the last threshold before ref-video's frontier drops to fixed-interval's level;
    # figures: benchmarks/RESULTS.md, "Default thresholds".
    threshold: float = param(0.06, "compute when the accumulated rescaled input change reaches this (0 = every step)",
                             low=0)
    calibration: str = param("", "calibration file; '' = calibration/teacache.json beside the model (cadence "
                                 "calibrate)")


@dataclass
class _BranchState:
    previous: torch.Tensor | None = None  # modulated input of the previous forward
    previous_step: int | None = None
    accumulated: float = 0.0  # rescaled change since the last computed forward


class Rescaler:
    """The fitted polynomial, clamped at zero. Beyond the calibrated range of input changes
    (fewer steps than calibrated give larger changes) it grows linearly from the range's
    end: a degree-4 fit may turn down there, and a rescaled change that falls to zero would
    stop the accumulator, so that every step until the last would be reused."""

    def __init__(self, coefficients: list[float], x_max: float):
        self.coefficients = np.asarray(coefficients, dtype=np.float64)
        self.x_max = x_max
        self.at_max = max(0.0, float(np.polyval(self.coefficients, x_max)))

    def __call__(self, change: float) -> float:
        if change > self.x_max > 0:
            return self.at_max * change / self.x_max
        return max(0.0, float(np.polyval(self.coefficients, change)))


class TeaCache(Policy):
    def __init__(self, config: TeaCacheConfig, rescale: Rescaler):
        super().__init__(config)
        self.rescale = rescale

    def new_state(self):
        return _BranchState()

    def _observe(self, state: _BranchState, probe) -> torch.Tensor:
        modulated = probe.modulated_input()
        state.previous, state.previous_step = modulated, probe.context.step_index
        return modulated

    def distance(self, state: _BranchState, probe, since):
        previous = state.previous
        modulated = self._observe(state, probe)
        if previous is None or previous.shape != modulated.shape:
            return math.inf
        state.accumulated += self.rescale(recording.relative_l1(modulated, previous))
        return state.accumulated

    def threshold(self):
        return self.config.threshold

    def must_compute(self, state, probe, since):
        num_steps = probe.context.num_steps
        return num_steps is not None and probe.context.step_index >= num_steps - 1

    def computed(self, state: _BranchState, probe, residual, encoder_residual):
        if state.previous_step != probe.context.step_index:  # no distance this forward (the first)
            self._observe(state, probe)
        state.accumulated = 0.0


def fit(traces: list[recording.Trace]) -> dict:
    """``np.polyfit(modulated_l1, output_l1, 4)`` over the step transitions of every trace
    but the one into the last step. That step always computes, so its pair never informs a
    decision, and there the output jumps several times further than anywhere else at similar
    input changes: kept, that one outlier doubled the RMS fit residual and moved the
    computed steps to worse places (benchmarks/RESULTS.md, "Default thresholds")."""
    x, y = [], []
    for trace in traces:
        length = min(len(trace.modulated_l1), len(trace.output_l1)) - 1
        x += trace.modulated_l1[:length]
        y += trace.output_l1[:length]
    if len(x) <= DEGREE:
        raise ValueError(
            f"teacache: {len(x)} step transitions recorded (the one into the last step left out), a degree-"
            f"{DEGREE} fit needs at least {DEGREE + 1}; calibrate on more prompts or more steps"
        )
    x, y = np.asarray(x), np.asarray(y)
    coefficients = np.polyfit(x, y, DEGREE)
    fit_residual = float(np.sqrt(np.mean((np.polyval(coefficients, x) - y) ** 2)))  # RMS, in output rel-L1
    return {
        "coefficients": [float(c) for c in coefficients],  # highest power first
        "fit_residual": fit_residual,
        "input_range": [float(x.min()), float(x.max())],
        "transitions": len(x),
    }


def calibrate(pipe, runs, path=None, progress=None) -> Path:
    """Record ``pipe(**run)`` for each run with every forward computed, fit the rescaling
    polynomial and save it (default: beside the model). -> the file written."""
    runs = list(runs)
    traces = recording.record(pipe, runs, progress=progress)
    return calibration.save(find_transformer(pipe), TECHNIQUE, {**fit(traces), **calibration.runs_summary(runs)}, path)


def describe_calibration(data: dict) -> str:
    coefficients = ", ".join(f"{c:.4g}" for c in data["coefficients"])
    low, high = data["input_range"]
    return (f"poly4 coefficients [{coefficients}] (highest power first) over {data['transitions']} step transitions, "
            f"input change {low:.3g}..{high:.3g}, RMS fit residual {data['fit_residual']:.3g}")


def apply(model: torch.nn.Module, config: TeaCacheConfig) -> Handle:
    data = calibration.load(model, TECHNIQUE, config.calibration)
    return install(model, TeaCache(config, Rescaler(data["coefficients"], data["input_range"][1])))


register(TeaCacheConfig, apply, Calibration(TECHNIQUE, calibrate, describe_calibration))

__all__ = ["TeaCacheConfig", "apply", "calibrate"]
