"""Activation calibration across the timestep set.

A diffusion transformer's activations change with the timestep (TFMQ-DM, QuEST): a range
measured at one step clips the inputs of another. cadence runs whole generations of
training captions and records, for every quantizable linear, the largest |x| of each input
channel over all tokens, steps and branches (what SmoothQuant's factors and a static
per-tensor scale need) and the largest |x| per step (how much the range moves with t).

Saved with the other calibrations (``<transformer dir>/calibration/activations.json``,
packaged for the reference models), tagged with the model's identity.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from cadence.accel import calibration as files
from cadence.accel.registry import Calibration
from cadence.context import attach_context, detach_context
from cadence.models import find_transformer, quantizable_linears

TECHNIQUE = "activations"



def record_activations(pipe, runs: Iterable[dict[str, Any]], progress=None) -> dict[str, dict]:
    """Run ``pipe(**run)`` for each run; -> {linear name: {channel_absmax, step_absmax}}."""
    model = find_transformer(pipe)
    linears = quantizable_linears(model, "quantize")  # the timestep path too, in case it is asked for
    context = attach_context(model)
    channel: dict[str, torch.Tensor] = {}
    per_step: dict[str, dict[int, torch.Tensor]] = {name: {} for name in linears}

    def hook(name):
        def record(module, inputs):
            x = inputs[0].detach().reshape(-1, module.in_features).abs().amax(dim=0).float()  # (in,)
            channel[name] = torch.maximum(channel[name], x) if name in channel else x
            step = per_step[name]
            step[context.step_index] = torch.maximum(step[context.step_index], x.max()) \
                if context.step_index in step else x.max()
        return record

    handles = [linear.register_forward_pre_hook(hook(name)) for name, linear in linears.items()]
    try:
        with torch.no_grad():
            for run in runs:
                pipe(**run)
                if progress is not None:
                    progress.update()
    finally:
        for handle in handles:
            handle.remove()
        detach_context(model)
    return {name: {"channel_absmax": [float(f"{v:.5g}") for v in channel[name].tolist()],
                   "step_absmax": [float(f"{float(per_step[name][s]):.5g}") for s in sorted(per_step[name])]}
            for name in linears if name in channel}


def calibrate(pipe, runs: Iterable[dict[str, Any]], path: Path | None = None, progress=None) -> Path:
    """``cadence calibrate --technique fp8|int8|nvfp4|mxfp4``: the activation ranges."""
    runs = list(runs)
    layers = record_activations(pipe, runs, progress)
    return files.save(find_transformer(pipe), TECHNIQUE, {"runs": len(runs), "layers": layers}, path)


def describe_calibration(data: dict) -> str:
    layers = data["layers"]
    spread = {name: max(v["step_absmax"]) / max(min(v["step_absmax"]), 1e-12) for name, v in layers.items()}
    outlier = {name: max(v["channel_absmax"]) / max(statistics.median(v["channel_absmax"]), 1e-12)
               for name, v in layers.items()}
    widest = max(spread, key=spread.get)
    return (f"{len(layers)} linears over {data['runs']} generations. Input range across timesteps (max/min of "
            f"the per-step max|x|): median {statistics.median(spread.values()):.2f}x, widest {spread[widest]:.2f}x "
            f"({widest}). Outlier channels (max/median channel max|x|): median "
            f"{statistics.median(outlier.values()):.1f}x, largest {max(outlier.values()):.1f}x.")


@dataclass
class ActivationStats:
    layers: dict[str, dict]
    source: str

    def channel_absmax(self, name: str, device) -> torch.Tensor:
        if name not in self.layers:
            raise ValueError(f"the activation calibration {self.source} has no entry for {name}: recalibrate with "
                             "`cadence calibrate --technique int8`")
        return torch.tensor(self.layers[name]["channel_absmax"], device=device, dtype=torch.float32)


def load_activations(model: torch.nn.Module, path: str = "") -> ActivationStats:
    try:
        data = files.load(model, TECHNIQUE, path)
    except ValueError as error:
        refused = ValueError(f"{error} (SmoothQuant and static activation scales need it; run `cadence calibrate "
                             "--technique int8`, or use smooth=0 and activations=dynamic)")
        if hasattr(error, "missing_calibration"):  # the store to make: cadence tune makes it and tries again
            refused.missing_calibration = error.missing_calibration
        raise refused from None
    return ActivationStats(data["layers"], path or str(files.default_path(model, TECHNIQUE)))


def smoothing_factors(channel_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant: s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha), per input channel j."""
    weight_absmax = weight.abs().amax(dim=0).float().clamp_min(1e-5)
    return (channel_absmax.clamp_min(1e-5) ** alpha / weight_absmax ** (1 - alpha)).clamp_min(1e-5)


# The FP8, INT8 and FP4 techniques read the same measurement (SmoothQuant factors, static scales).
ACTIVATION_RANGES = Calibration(TECHNIQUE, calibrate, describe_calibration)
