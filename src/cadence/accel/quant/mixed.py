"""Mixed precision: a precision per linear, chosen from measured sensitivity under a
memory budget or an error budget (MixDQ).

Sensitivity: the error of the guided noise prediction, ``uncond + g (cond - uncond)``,
when that one layer alone is quantized in that format, relative to the float prediction
(mean squared error over squared norm), averaged over calibration prompts and timesteps
spread over the whole schedule. CFG multiplies the branches' difference by g, so the guided
prediction, not either branch, is what the sampler sees. Errors of different layers are
taken to add, as MixDQ does.

Allocation is a multiple-choice knapsack solved greedily: every layer starts at its smallest
format, and the upgrade with the largest error decrease per byte that still fits is taken
until none fits (memory budget); or every layer starts in full precision and the downgrade
that saves the most bytes per unit of error is taken while the total stays under the error
budget.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from cadence.accel import calibration as files
from cadence.accel.quant._base import GROUPS, QuantConfig, install, unsupported
from cadence.accel.quant.formats import FORMATS, get_format
from cadence.accel.quant.linear import QuantLinear
from cadence.accel.registry import Calibration, Handle, param, register
from cadence.context import attach_context, detach_context
from cadence.models import find_transformer, quantizable_linears

TECHNIQUE = "sensitivity"
FULL = "bf16"  # the layer keeps its float weight; accounted at 2 bytes a weight
DEFAULT_FORMATS = ("bf16", "weight-int8", "weight-int4", "weight-int2")
CALIBRATION_RUNS = 1  # prompts; x STEPS_SAMPLED steps x 2 branches forwards per layer and format
STEPS_SAMPLED = 4


def layer_bytes(linear: torch.nn.Linear, fmt: str, group: int = 128) -> int:
    """Bytes of ``linear``'s weight in ``fmt`` (float: bf16), as QuantLinear stores it."""
    if fmt == FULL:
        return 2 * linear.out_features * linear.in_features
    return get_format(fmt).stored_bytes(linear.out_features, linear.in_features, group)


def choices() -> tuple[str, ...]:
    """The formats a layer can take: full precision and every registered format."""
    return (FULL,) + tuple(FORMATS)


# -- sensitivity ------------------------------------------------------------------------
def _record_inputs(pipe, runs: list[dict]) -> list[dict[str, tuple]]:
    """Per run, the transformer's (args, kwargs) of both CFG branches at STEPS_SAMPLED steps
    spread over the schedule: [{branch: (args, kwargs, guidance)}]."""
    model = find_transformer(pipe)
    context = attach_context(model)
    captured: list[dict] = []

    def capture(module, args, kwargs):
        steps = context.num_steps or STEPS_SAMPLED
        wanted = {round(i * (steps - 1) / max(1, STEPS_SAMPLED - 1)) for i in range(STEPS_SAMPLED)}
        if context.step_index in wanted:
            captured[-1].setdefault(context.step_index, {})[context.branch] = (args, dict(kwargs))

    handle = model.register_forward_pre_hook(capture, with_kwargs=True, prepend=False)
    samples = []
    try:
        with torch.no_grad():
            for run in runs:
                captured.append({})
                pipe(**run)
                guidance = run.get("guidance_scale", 1.0)
                samples += [dict(branches, guidance=guidance) for branches in captured[-1].values()]
    finally:
        handle.remove()
        detach_context(model)
    return samples


def _guided(model, sample: dict) -> torch.Tensor:
    outputs = {}
    for branch in ("cond", "uncond"):
        if branch in sample:
            args, kwargs = sample[branch]
            output = model(*args, **kwargs)
            outputs[branch] = (output[0] if isinstance(output, tuple) else output.sample).float()
    if "uncond" not in outputs:
        return outputs["cond"]
    return outputs["uncond"] + sample["guidance"] * (outputs["cond"] - outputs["uncond"])


def measure_sensitivity(pipe, runs: Iterable[dict[str, Any]], formats: Iterable[str] = DEFAULT_FORMATS[1:],
                        progress=None, group: int = 128) -> dict[str, dict[str, float]]:
    """layer -> format -> relative squared error of the guided prediction, that layer alone quantized."""
    model = find_transformer(pipe)
    samples = _record_inputs(pipe, list(runs)[:CALIBRATION_RUNS])
    linears = quantizable_linears(model)
    with torch.no_grad():
        references = [_guided(model, sample) for sample in samples]
        result: dict[str, dict[str, float]] = {}
        for name, linear in linears.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            result[name] = {}
            for fmt in formats:
                if unsupported(linear, fmt, group):
                    continue
                setattr(parent, child, QuantLinear.from_linear(linear, fmt, group=group))
                try:
                    errors = [float((_guided(model, s) - r).pow(2).mean() / r.pow(2).mean().clamp_min(1e-20))
                              for s, r in zip(samples, references)]
                finally:
                    setattr(parent, child, linear)
                result[name][fmt] = statistics.fmean(errors)
            if progress is not None:
                progress.update()
    return result


def calibrate(pipe, runs: Iterable[dict[str, Any]], path: Path | None = None, progress=None) -> Path:
    """``cadence calibrate --technique mixed``: every layer's sensitivity to every format."""
    model = find_transformer(pipe)
    runs = list(runs)[:CALIBRATION_RUNS]  # read once: an iterator would be spent by the measurement
    if progress is not None:
        progress.reset(total=len(quantizable_linears(model)))
        progress.unit = "layer"
    sensitivity = measure_sensitivity(pipe, runs, DEFAULT_FORMATS[1:] + ("fp8", "int8"), progress)
    data = {"runs": len(runs), "steps_sampled": STEPS_SAMPLED, "layers": sensitivity}
    return files.save(model, TECHNIQUE, data, path)


def describe_calibration(data: dict) -> str:
    layers = data["layers"]
    lines = [f"{len(layers)} linears, {data['runs']} prompts x {data['steps_sampled']} steps, guided prediction."]
    formats = sorted({fmt for errors in layers.values() for fmt in errors})
    for fmt in formats:
        errors = {name: e[fmt] for name, e in layers.items() if fmt in e}
        worst = max(errors, key=errors.get)
        lines.append(f"  {fmt}: median {statistics.median(errors.values()):.2e}, worst {errors[worst]:.2e} ({worst}), "
                     f"sum {sum(errors.values()):.2e}")
    return "\n".join(lines)


# -- allocation -------------------------------------------------------------------------
def allocate(errors: dict[str, dict[str, float]], sizes: dict[str, dict[str, int]], *,
             memory: int | None = None, error: float | None = None) -> dict[str, str]:
    """layer -> format, minimising the summed error under ``memory`` bytes, or the bytes
    under a summed ``error``. ``errors[layer][FULL]`` is 0."""
    if (memory is None) == (error is None):
        raise ValueError("allocate: give exactly one of memory= and error=")
    if memory is not None:
        choice = {layer: min(sizes[layer], key=sizes[layer].get) for layer in errors}
        used = sum(sizes[layer][fmt] for layer, fmt in choice.items())
        if used > memory:
            raise ValueError(f"the memory budget ({memory} bytes) is below the smallest possible ({used} bytes)")
        while True:
            best, best_gain = None, 0.0
            for layer, fmt in choice.items():
                for option in sizes[layer]:
                    extra = sizes[layer][option] - sizes[layer][fmt]
                    gain = errors[layer][fmt] - errors[layer][option]
                    if extra > 0 and gain > 0 and used + extra <= memory and gain / extra > best_gain:
                        best, best_gain = (layer, option, extra), gain / extra
            if best is None:
                return choice
            layer, option, extra = best
            choice[layer], used = option, used + extra
    choice = {layer: FULL for layer in errors}
    total = 0.0
    while True:
        best, best_ratio = None, 0.0
        for layer, fmt in choice.items():
            for option in sizes[layer]:
                saved = sizes[layer][fmt] - sizes[layer][option]
                added = errors[layer][option] - errors[layer][fmt]
                if saved > 0 and total + max(added, 0.0) <= error:
                    ratio = saved / max(added, 1e-30)
                    if ratio > best_ratio:
                        best, best_ratio = (layer, option, added), ratio
        if best is None:
            return choice
        layer, option, added = best
        choice[layer], total = option, total + added


@dataclass(frozen=True)
class MixedConfig(QuantConfig):
    name = "mixed"
    summary = "a precision per linear from measured sensitivity, under a memory or an error budget (MixDQ)"
    mode = "mixed"

    memory: float = param(0.3, "weight memory of the quantizable linears, as a fraction of bf16 (0: use error instead)")
    error: float = param(0.0, "summed relative squared error of the guided prediction allowed (used when memory=0)")
    formats: str = param(",".join(DEFAULT_FORMATS), f"comma-separated choices among {', '.join(choices())}")
    group: int = param(128, "input channels per scale of the group-wise formats", choices=GROUPS)
    sensitivity: str = param("", "sensitivity file (default: calibration/sensitivity.json beside the model)")

    def validate(self):
        valid = choices()
        unknown = [f for f in self.format_list if f not in valid]
        self.require(self.format_list and not unknown,
                     f"formats={self.formats!r} has {unknown or 'no formats'}; valid: {', '.join(valid)}")
        self.require((self.memory > 0) != (self.error > 0) and self.memory >= 0 and self.error >= 0,
                     "give one budget: memory in (0, 1] (a fraction of the bf16 weight memory) or error > 0 with "
                     f"memory=0; got memory={self.memory}, error={self.error}")
        self.require(self.memory <= 1, f"memory={self.memory} must be in (0, 1]")

    @property
    def format_list(self) -> tuple[str, ...]:
        return tuple(f.strip() for f in self.formats.split(",") if f.strip())


def plan(model: torch.nn.Module, config: MixedConfig) -> dict[str, dict]:
    data = files.load(model, TECHNIQUE, config.sensitivity)
    linears = quantizable_linears(model, config.timestep_path)
    errors, sizes = {}, {}
    for name, linear in linears.items():
        measured = data["layers"].get(name, {})
        missing = [f for f in config.format_list if f != FULL and f not in measured and not unsupported(linear, f, config.group)]
        if missing:
            raise ValueError(f"{config.name}: the sensitivity calibration has no {', '.join(missing)} for {name}; "
                             "recalibrate with `cadence calibrate --technique mixed`")
        options = [f for f in config.format_list if f == FULL or f in measured]
        errors[name] = {f: 0.0 if f == FULL else measured[f] for f in options}
        sizes[name] = {f: layer_bytes(linear, f, config.group) for f in options}
    if config.memory:
        budget = int(config.memory * sum(layer_bytes(linear, FULL) for linear in linears.values()))
        choice = allocate(errors, sizes, memory=budget)
    else:
        choice = allocate(errors, sizes, error=config.error)
    return {name: {"mode": "none"} if fmt == FULL else {"mode": fmt, "group": config.group}
            for name, fmt in choice.items()}


def apply(model: torch.nn.Module, config: MixedConfig) -> Handle:
    return install(model, config, None if config.checkpoint else plan(model, config))


register(MixedConfig, apply, Calibration(TECHNIQUE, calibrate, describe_calibration))

__all__ = ["MixedConfig", "allocate", "apply", "layer_bytes", "measure_sensitivity"]
