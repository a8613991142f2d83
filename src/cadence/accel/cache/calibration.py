"""Offline calibration for the caching policies that need it (TeaCache's polynomial,
MagCache's magnitude curve, ERTACache's profile): record, on a few prompts with every
forward computed, how the first block's modulated input, the block-stack residual and
the model output change from step to step; save what a policy fits from that beside the
model, tagged with the model's identity so that it is never used on another model.

Calibration files live in ``<transformer dir>/calibration/<technique>.json`` (for the
reference models: inside the package), or wherever ``calibration=PATH`` points.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from cadence.accel.cache._base import Policy, StepPolicyConfig, StepReuse
from cadence.models import find_transformer


def model_identity(model: torch.nn.Module) -> dict:
    """Class, config digest and a weight fingerprint (robust to dtype and device). A model
    quantized by cadence answers for its float weights, so calibrations still match it."""
    quantization = getattr(model, "_cadence_quantization", None)
    if quantization is not None:
        return quantization.identity
    config = {k: v for k, v in dict(getattr(model, "config", {})).items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    with torch.no_grad():
        probe = sum(float(p.detach().flatten()[:64].float().abs().sum()) for p in model.parameters())
    return {"class": type(model).__name__, "config": digest, "weights": f"{probe:.4g}"}


def default_path(model: torch.nn.Module, technique: str) -> Path | None:
    source = getattr(getattr(model, "config", None), "_name_or_path", None)
    return Path(source) / "calibration" / f"{technique}.json" if source else None


def save(model: torch.nn.Module, technique: str, data: dict, path: Path | None = None) -> Path:
    path = Path(path) if path else default_path(model, technique)
    if path is None:
        raise ValueError(
            f"{technique}: the model was not loaded from a directory, so there is no place beside it for the "
            "calibration; give a path"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"technique": technique, "model": model_identity(model), **data}, indent=1) + "\n")
    return path


def load(model: torch.nn.Module, technique: str, path: str = "") -> dict:
    """The calibration of ``technique`` for ``model``; refuses one made for another model."""
    where = Path(path) if path else default_path(model, technique)
    if where is None or not where.is_file():
        raise ValueError(
            f"{technique}: no calibration for this {type(model).__name__} "
            f"({'looked in ' + str(where) if where else 'it was not loaded from a directory'}); run "
            f"`cadence calibrate --model MODEL --technique {technique}`, or pass calibration=PATH"
        )
    data = json.loads(where.read_text())
    if data.get("technique") != technique:
        raise ValueError(f"{technique}: {where} is a calibration for {data.get('technique')!r}, not {technique!r}")
    identity = model_identity(model)
    if data.get("model") != identity:
        raise ValueError(
            f"{technique}: calibration {where} was made for another model ({data.get('model')}); this model is "
            f"{identity}. Recalibrate with `cadence calibrate --technique {technique}`"
        )
    return data


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
    reuse.context._interceptors.append(tap)
    try:
        with torch.no_grad():
            for run in runs:
                recorder.start()
                pipe(**run)
                if progress is not None:
                    progress.update()
    finally:
        reuse.context._interceptors.remove(tap)
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
