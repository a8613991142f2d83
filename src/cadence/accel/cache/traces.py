"""What the calibrated step policies fit from (TeaCache's polynomial, MagCache's magnitude
curve, ERTACache's profile): recorded on a few prompts with every forward computed, how
the first block's modulated input, the block-stack residual and the model output change
from step to step, per CFG branch. The fitted result is saved through
:mod:`cadence.accel.calibration`, the store every calibrated technique shares.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from cadence.accel.cache._base import Policy, StepPolicyConfig, StepReuse
from cadence.models import find_transformer


@dataclass(frozen=True)
class _RecordConfig(StepPolicyConfig):
    name = "record"
    summary = "computes every forward and records its changes (calibration only)"


@dataclass
class Trace:
    """One generation's per-step record of one CFG branch. Lists index steps 1.. (the
    change from step t-1 to step t)."""

    branch: str
    modulated_l1: list[float] = field(default_factory=list)  # relative L1 of the modulated input
    output_l1: list[float] = field(default_factory=list)  # relative L1 of the model output
    residual_l1: list[float] = field(default_factory=list)  # relative L1 of the block-stack residual
    magnitude_ratio: list[float] = field(default_factory=list)  # mean over tokens of |r_t| / |r_t-1|
    residuals: list[torch.Tensor] = field(default_factory=list)  # kept only when asked


def relative_l1(new: torch.Tensor, old: torch.Tensor) -> float:
    return float((new.float() - old.float()).abs().mean() / old.float().abs().mean().clamp_min(1e-12))


class _Recorder(Policy):
    def __init__(self, keep_residuals: bool):
        super().__init__(_RecordConfig())
        self.keep = keep_residuals
        self.traces: list[Trace] = []
        self.previous: dict[str, dict[str, torch.Tensor]] = {}
        self.current: dict[str, Trace] = {}
        self.last_output: dict[str, torch.Tensor] = {}

    def threshold(self):
        return 0.0  # distance >= 0 always: every forward computes

    def start(self) -> None:
        self.previous.clear()
        self.current.clear()
        self.last_output.clear()

    def computed(self, state, probe, residual, encoder_residual):
        branch = traced_branch(probe.context.branch)
        trace = self.current.get(branch)
        if trace is None:
            trace = self.current[branch] = Trace(branch)
            self.traces.append(trace)
        now = {"modulated": probe.modulated_input().detach(), "residual": residual.detach()}
        before = self.previous.get(branch)
        if before is not None:
            trace.modulated_l1.append(relative_l1(now["modulated"], before["modulated"]))
            trace.residual_l1.append(relative_l1(now["residual"], before["residual"]))
            ratio = now["residual"].float().norm(dim=-1) / before["residual"].float().norm(dim=-1).clamp_min(1e-8)
            trace.magnitude_ratio.append(float(ratio.mean()))
        if self.keep:
            trace.residuals.append(now["residual"].cpu())
        self.previous[branch] = now

    def output(self, branch: str, sample: torch.Tensor) -> None:
        before = self.last_output.get(branch)
        if before is not None and branch in self.current:
            self.current[branch].output_l1.append(relative_l1(sample, before))
        self.last_output[branch] = sample.detach()


def traced_branch(branch: str) -> str:
    """The branch a trace is filed under. CogVideoX's pipeline runs both CFG branches as one
    batched forward ('cond_uncond'): its curve is the one the policies read as 'cond' (they
    fall back to it for a branch they were not calibrated on)."""
    return branch if branch == "uncond" else "cond"


class _OutputTap:
    def __init__(self, recorder: _Recorder):
        self.recorder = recorder

    def before(self, context, args, kwargs):
        return None

    def after(self, context, output):
        self.recorder.output(traced_branch(context.branch), output[0] if isinstance(output, tuple) else output.sample)


def record(pipe, runs: Iterable[dict[str, Any]], keep_residuals: bool = False, progress=None) -> list[Trace]:
    """Run ``pipe(**run)`` for each run with every forward computed; -> one trace per
    generation and CFG branch."""
    model = find_transformer(pipe)
    recorder = _Recorder(keep_residuals)
    reuse = StepReuse(model, recorder, "cadence.calibration-record")
    tap = _OutputTap(recorder)
    reuse.context.add_interceptor(tap)
    try:
        with torch.no_grad():
            for run in runs:
                recorder.start()
                pipe(**run)
                if progress is not None:
                    progress.update()
    finally:
        reuse.context.remove_interceptor(tap)
        reuse.remove()
    return recorder.traces


def per_step_mean(traces: list[Trace], attribute: str) -> list[float]:
    """Mean over traces of a per-step list (all traces of one step count)."""
    series = [getattr(t, attribute) for t in traces if getattr(t, attribute)]
    length = min(map(len, series))
    return [sum(s[i] for s in series) / len(series) for i in range(length)]


def interpolate(curve: list[float], num_steps: int) -> list[float]:
    """Nearest-neighbour resampling of a per-step curve (of len N-1, the changes into steps
    1..N-1) to another number of steps."""
    if len(curve) == num_steps - 1:
        return list(curve)
    if num_steps <= 1:
        return []
    scale = (len(curve) - 1) / max(1, num_steps - 2)
    return [curve[round(i * scale)] for i in range(num_steps - 1)]
