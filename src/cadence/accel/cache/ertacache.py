"""ERTACache (Peng et al. 2025, "ERTACache: Error Rectification and Timesteps Adjustment
for Efficient Diffusion", arXiv 2508.21091): step reuse on a schedule fixed offline, with
the error of each reused step corrected twice.

What follows the paper's text. Only its abstract and the README of bytedance/ERTACache
were available to us, not the method section; they state three parts and what each is
for: (a) an offline residual-profiling stage picks the reusable steps, so the cache
schedule is fixed before the run; (b) a trajectory-aware correction coefficient adjusts
the integration interval of reused steps, against the "step amplification error" of
reusing under a fixed timestep schedule; (c) a closed-form linear model approximates the
additive error of the cached output and rectifies it, against the "feature shift error".

What is cadence's interpretation (the equations, the fitting, where they apply):
- (a) the profile is the relative L1 change of the block-stack residual into each step,
  averaged over calibration runs and CFG branches (``traces.Trace.residual_l1``).
  The distance is its sum since the last computed step and a step computes when it
  reaches ``threshold`` (or after ``max_age`` reuses): a function of step indices only,
  hence a static schedule. A run with another number of steps resamples the cumulative
  profile, and the maps of (b) and (c) are taken at the nearest calibrated step and age.
- (c) ``r_t ~ a ⊙ r_{t-k} + b``: for every step t, cache age k <= max_age and CFG branch, a
  per-channel affine map of the residual cached k steps earlier, fitted in closed form by
  least squares over tokens and calibration runs, ridge-shrunk toward plain reuse (a=1,
  b=0) so that no channel strays far on little evidence. It rectifies the residual, not
  the model output: the output head (a modulated LayerNorm) is not linear.
- (b) ``s = <v_t, v~_t> / |v~_t|^2``, one scalar per (t, k, branch): v_t is the model output
  with every block computed, v~_t the output when the stack is reused from step t-k
  (rectified, or plain when ``rectify=false``), both at the same latent of a full-compute
  trajectory. A reused step's output is multiplied by s, which for a flow-matching
  (Euler) step ``x + dt * v`` is the step ``x + (s * dt) * v~``: its interval rescaled.
  s is measured exactly, by a second calibration pass that replays the cached stack at
  every age beside each computed forward (the head is cheap, so this costs little more
  than the first pass); the ratio on the residual would not do, since after (c) it is
  about 1 by construction and it ignores the head.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from diffusers.hooks import HookRegistry, ModelHook

from cadence.accel import calibration
from cadence.accel.cache import traces as recording
from cadence.accel.cache._base import (
    Policy,
    StepPolicyConfig,
    StepReuse,
    _sample,
    _with_sample,
    pack_block_output,
    unpack_block_output,
)
from cadence.accel.registry import Calibration, Handle, param, register
from cadence.context import attach_context, detach_context
from cadence.models import adapter_for, find_transformer

TECHNIQUE = "ertacache"
MODES = ("rectified", "plain")  # the reused output s is measured on: with or without (c)


@dataclass(frozen=True)
class ERTACacheConfig(StepPolicyConfig):
    name = TECHNIQUE
    summary = ("ERTACache: static reuse schedule from an offline residual profile; reused residuals rectified by a "
               "calibrated per-channel affine map, reused outputs rescaled (the step's interval)")

    # 0.3: on the reference models' profiles (large into step 1, small mid-run, larger at the end) it
    # computes the first steps, then every 3rd-4th, every 2nd at the end (benchmarks/RESULTS.md, "Default thresholds")
    threshold: float = param(0.3, "compute when the profiled residual change since the last computed step reaches "
                                  "this (0 = every step)", low=0)
    max_age: int = param(4, "at most this many steps since the last computed one", low=1)
    rectify: bool = param(True, "rectify the reused residual: a * r + b per channel")
    adjust_timesteps: bool = param(True, "rescale a reused step's output (its integration interval) by the "
                                         "calibrated coefficient")
    calibration: str = param("", "calibration file; '' = calibration/ertacache.json beside the model (cadence "
                                 "calibrate)")


# -- calibration ---------------------------------------------------------------------------

def fit_affine(x: torch.Tensor, y: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel (last dim) of ``x, y`` (samples, C): ``a, b`` minimising
    ``|a x + b - y|^2 + ridge * (Sxx (a - 1)^2 + n b^2)``, the penalty scaled by the data so
    that ``ridge`` means the same at any residual magnitude. -> (C,), (C,)."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    sxx, sx, sy, sxy = (x * x).sum(0), x.sum(0), y.sum(0), (x * y).sum(0)
    # normal equations [[(1+ridge) Sxx, Sx], [Sx, (1+ridge) n]] [a, b] = [Sxy + ridge Sxx, Sy]
    m11, m12, m22 = (1 + ridge) * sxx, sx, (1 + ridge) * n
    r1, r2 = sxy + ridge * sxx, sy
    det = m11 * m22 - m12 * m12  # > 0 by Cauchy-Schwarz unless the channel is all zero
    solvable = det > 1e-12 * (m11 * m22).clamp_min(1e-300)
    safe = torch.where(solvable, det, torch.ones_like(det))
    a = torch.where(solvable, (r1 * m22 - m12 * r2) / safe, torch.ones_like(det))
    b = torch.where(solvable, (m11 * r2 - m12 * r1) / safe, torch.zeros_like(det))
    return a.float(), b.float()


def fit_rectification(traces: list[recording.Trace], max_age: int, ridge: float) -> dict[str, torch.Tensor]:
    """-> ``{"<branch>.gain": (steps, max_age, C), "<branch>.bias": ...}``; entry [t, k-1]
    maps the residual of step t-k to that of step t (identity where t < k)."""
    tables = {}
    for branch in sorted({t.branch for t in traces}):
        series = [t.residuals for t in traces if t.branch == branch and t.residuals]
        steps = min(map(len, series))
        channels = series[0][0].shape[-1]
        gain, bias = torch.ones(steps, max_age, channels), torch.zeros(steps, max_age, channels)
        for t in range(1, steps):
            y = torch.cat([s[t].reshape(-1, channels) for s in series])  # (runs * batch * tokens, C)
            for k in range(1, min(max_age, t) + 1):
                x = torch.cat([s[t - k].reshape(-1, channels) for s in series])
                gain[t, k - 1], bias[t, k - 1] = fit_affine(x, y, ridge)
        tables[f"{branch}.gain"], tables[f"{branch}.bias"] = gain, bias
    return tables


def _rectify(residual: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return residual * gain.to(residual) + bias.to(residual)


class _ReplayHook(ModelHook):
    """Calibration only. A full forward records the stack residual; a replayed one adds
    the given residual at the first block and passes the others through, as a reused
    forward of the engine does."""

    def __init__(self, probe: "_ScaleProbe", index: int, metadata):
        super().__init__()
        self.probe, self.index, self.metadata = probe, index, metadata

    def new_forward(self, module, *args, **kwargs):
        probe, metadata = self.probe, self.metadata
        get = metadata._get_parameter_from_args_kwargs
        hidden = get(metadata.hidden_states_argument_name, args, kwargs)
        encoder = None
        if metadata.return_encoder_hidden_states_index is not None:
            encoder = get(metadata.encoder_hidden_states_argument_name, args, kwargs)
        if probe.replay is not None:
            if self.index == 0:
                residual, encoder_residual = probe.replay
                hidden = hidden + residual
                if encoder is not None and encoder_residual is not None:
                    encoder = encoder + encoder_residual
            return pack_block_output(metadata, hidden, encoder)
        if self.index == 0:
            probe.stack_input = (hidden, encoder)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.index == probe.last_block:
            out_hidden, out_encoder = unpack_block_output(metadata, output)
            in_hidden, in_encoder = probe.stack_input
            probe.residual = (out_hidden - in_hidden, out_encoder - in_encoder if out_encoder is not None else None)
        return output


class _ScaleProbe:
    """Beside each computed forward of a full-compute run, replays the stack cached 1..K
    steps earlier (rectified and plain) through the same transformer call and sums
    <v, v~> and |v~|^2 per (branch, mode, step, age)."""

    HOOK = "cadence.ertacache-calibration"

    def __init__(self, model, tables: dict[str, torch.Tensor], max_age: int, steps: int):
        adapter = adapter_for(model)
        self.model, self.blocks, self.tables, self.max_age, self.steps = model, adapter.blocks, tables, max_age, steps
        self.last_block = len(self.blocks) - 1
        self.replay = self.stack_input = self.residual = self.call = None
        self.replaying = False
        self.history: dict[str, dict[int, tuple]] = {}  # branch -> step -> (residual, encoder residual)
        self.sums: dict[tuple[str, str], torch.Tensor] = {}  # (branch, mode) -> (steps, K, 2): <v,v~>, |v~|^2
        self.context = attach_context(model)
        for index, (block, metadata) in enumerate(zip(self.blocks, adapter.metadata)):
            registry = HookRegistry.check_if_exists_or_initialize(block)
            registry.register_hook(_ReplayHook(self, index, metadata), self.HOOK)
        self.context.add_interceptor(self)

    def remove(self) -> None:
        self.context.remove_interceptor(self)
        for block in self.blocks:
            HookRegistry.check_if_exists_or_initialize(block).remove_hook(self.HOOK, recurse=False)
        detach_context(self.model)

    def start(self) -> None:
        self.history.clear()

    def before(self, context, args, kwargs):
        if not self.replaying:
            self.call = (args, kwargs)
        return None

    def after(self, context, output):
        if self.replaying:
            return None
        step, branch = context.step_index, context.branch
        history = self.history.setdefault(branch, {})
        full = _sample(output).float()
        for age in range(1, self.max_age + 1 if step < self.steps else 1):
            if step - age not in history:
                continue
            residual, encoder_residual = history[step - age]
            gain, bias = self.tables[f"{branch}.gain"], self.tables[f"{branch}.bias"]
            rectified = _rectify(residual, gain[step, age - 1], bias[step, age - 1])
            for mode, replayed in zip(MODES, (rectified, residual)):
                reused = self._replay((replayed, encoder_residual))
                sums = self.sums.setdefault((branch, mode), torch.zeros(self.steps, self.max_age, 2, dtype=torch.float64))
                sums[step, age - 1, 0] += float((full * reused).sum())
                sums[step, age - 1, 1] += float((reused * reused).sum())
        history[step] = self.residual
        history.pop(step - self.max_age, None)
        return None

    def _replay(self, replay) -> torch.Tensor:
        args, kwargs = self.call
        self.replay, self.replaying = replay, True
        try:
            return _sample(self.model(*args, **kwargs)).float()
        finally:
            self.replay, self.replaying = None, False

    def scales(self) -> dict[str, dict[str, list[list[float]]]]:
        """branch -> mode -> [step][age - 1]: s, clamped to [0, 2] (never reverse a step,
        never more than double it); 1 where nothing was measured. Small values are real:
        on ref-image the last step's output differs from its reuse by 1.5x its norm
        (s ~ 0.3), though the residual changed little, since the head's modulation moved."""
        result: dict[str, dict[str, list[list[float]]]] = {}
        for (branch, mode), sums in self.sums.items():
            products, norms = sums[..., 0], sums[..., 1]
            scale = torch.where(norms > 0, products / norms.clamp_min(1e-300), torch.ones_like(products))
            result.setdefault(branch, {})[mode] = [[round(float(s), 6) for s in row] for row in scale.clamp(0.0, 2.0)]
        return result


def calibrate(pipe, runs, path=None, *, max_age: int = 4, ridge: float = 0.1, progress=None) -> Path:
    """Run ``pipe(**run)`` for each run, twice, with every forward computed: the first pass
    profiles the residual change per step and fits the rectification, the second measures
    the output scale. Writes ``<path>.json`` (profile, scales) and, beside it,
    ``<path>.safetensors`` (the per-channel maps, float32: steps x max_age x hidden x 2 per
    branch, ~0.3 MB for 20 steps of a 256-wide model). ``progress`` (a tqdm bar) advances
    once per generation. -> the JSON path."""
    runs = list(runs)
    if not runs:
        raise ValueError("ertacache: calibration needs at least one run")
    if max_age < 1 or not ridge > 0:
        raise ValueError(f"ertacache: calibration needs max_age >= 1 and ridge > 0, got {max_age}, {ridge}")
    model = find_transformer(pipe)
    if progress is not None and hasattr(progress, "total"):
        progress.total = 2 * len(runs)
        progress.refresh()
    traces = recording.record(pipe, runs, keep_residuals=True, progress=progress)
    distance = recording.per_step_mean(traces, "residual_l1")
    steps = len(distance) + 1
    tables = {name: table[:steps] for name, table in fit_rectification(traces, max_age, ridge).items()}
    probe = _ScaleProbe(model, tables, max_age, steps)
    try:
        with torch.no_grad():
            for run in runs:
                probe.start()
                pipe(**run)
                if progress is not None:
                    progress.update()
    finally:
        probe.remove()
    blob = safetensors.torch.save({name: table.contiguous() for name, table in tables.items()})
    data = {
        "steps": steps, "max_age": max_age, "ridge": ridge,
        "prompts": [run["prompt"] for run in runs if isinstance(run.get("prompt"), str)],
        "distance": [round(d, 6) for d in distance],
        "scale": probe.scales(),
        "rectification_sha256": hashlib.sha256(blob).hexdigest(),
    }
    where = calibration.save(model, TECHNIQUE, data, path)
    where.with_suffix(".safetensors").write_bytes(blob)
    return where


def describe_calibration(data: dict) -> str:
    scales = [s for modes in data["scale"].values() for rows in modes.values() for row in rows for s in row]
    return (f"residual profile over {data['steps']} steps (sum {sum(data['distance']):.3g}); per-channel maps for "
            f"ages 1..{data['max_age']} (ridge {data['ridge']}), branches {', '.join(sorted(data['scale']))}; "
            f"output scales {min(scales):.4f}..{max(scales):.4f}")


def _load_rectification(model, config: ERTACacheConfig, data: dict) -> dict[str, torch.Tensor]:
    where = Path(config.calibration) if config.calibration else calibration.default_path(model, TECHNIQUE)
    tensors = where.with_suffix(".safetensors")
    if not tensors.is_file():
        raise ValueError(f"ertacache: {tensors} (the rectification maps of {where}) is missing; recalibrate, "
                         "or pass rectify=false")
    blob = tensors.read_bytes()
    if hashlib.sha256(blob).hexdigest() != data.get("rectification_sha256"):
        raise ValueError(f"ertacache: {tensors} does not belong to {where} (its digest differs); recalibrate")
    return safetensors.torch.load(blob)


# -- the policy ----------------------------------------------------------------------------

def resample(profile: list[float], num_steps: int) -> list[float]:
    """The change into each step of a run of ``num_steps``, from the calibrated run's: the
    cumulative change, linear in the fraction of the trajectory, differenced. It keeps the
    total: at 6 steps each step covers ~4 calibrated steps of 20 and changes as much (a
    nearest-neighbour resampling would reuse ~4x too long)."""
    if len(profile) == num_steps - 1 or num_steps <= 1:
        return list(profile) if num_steps > 1 else []
    cumulative = [0.0, *itertools.accumulate(profile)]
    intervals = len(profile)

    def at(fraction: float) -> float:
        x = fraction * intervals
        i = min(int(x), intervals - 1)
        return cumulative[i] + (x - i) * profile[i]

    points = [at(i / (num_steps - 1)) for i in range(num_steps)]
    return [after - before for before, after in zip(points, points[1:])]


class ERTACache(Policy):
    def __init__(self, config: ERTACacheConfig, data: dict, tables: dict[str, torch.Tensor] | None):
        super().__init__(config)
        self.profile = data["distance"]  # [i]: change into step i + 1
        self.steps, self.calibrated_age = data["steps"], data["max_age"]
        self.scale = data["scale"]
        self.tables = tables or {}
        self._curves: dict[int | None, list[float]] = {}

    def threshold(self):
        return self.config.threshold

    def _curve(self, num_steps: int | None) -> list[float]:
        if num_steps not in self._curves:
            self._curves[num_steps] = resample(self.profile, num_steps) if num_steps else self.profile
        return self._curves[num_steps]

    def distance(self, state, probe, since):
        curve = self._curve(probe.context.num_steps)
        step = probe.context.step_index
        return sum(curve[min(i, len(curve) - 1)] for i in range(step - since, step))

    def must_compute(self, state, probe, since):
        return since >= self.config.max_age

    def calibrated(self, step: int, since: int, num_steps: int | None) -> tuple[int, int] | None:
        """(step, age) of the calibration nearest to this reuse, on the calibrated number of
        steps; None where it has no map (the first step)."""
        if num_steps and num_steps != self.steps:
            scale = (self.steps - 1) / max(1, num_steps - 1)
            step, since = round(step * scale), round(since * scale)
        if not 1 <= step < self.steps:
            return None
        return step, min(max(since, 1), self.calibrated_age, step)

    def _branch(self, branch: str, known) -> str:
        return branch if branch in known else "cond"  # calibrated without CFG: one branch

    def reuse(self, state, probe, residual, encoder_residual, since):
        context = probe.context
        where = self.calibrated(context.step_index, since, context.num_steps) if self.config.rectify else None
        if where is None:
            return residual, encoder_residual
        branch = self._branch(context.branch, {name.split(".")[0] for name in self.tables})
        step, age = where
        gain, bias = self.tables[f"{branch}.gain"][step, age - 1], self.tables[f"{branch}.bias"][step, age - 1]
        if gain.shape[-1] != residual.shape[-1]:
            raise ValueError(
                f"ertacache: calibration maps {gain.shape[-1]} channels, the residual has {residual.shape[-1]}")
        return _rectify(residual, gain, bias), encoder_residual

    def output_scale(self, branch: str, step: int, since: int, num_steps: int | None) -> float:
        where = self.calibrated(step, since, num_steps)
        if where is None:
            return 1.0
        scales = self.scale[self._branch(branch, self.scale)]["rectified" if self.config.rectify else "plain"]
        return scales[where[0]][where[1] - 1]


class _OutputScale:
    """(b): multiplies the model output of a reused forward by its calibrated scale."""

    def __init__(self, reuse: StepReuse, policy: ERTACache):
        self.reuse, self.policy = reuse, policy

    def before(self, context, args, kwargs):
        return None

    def after(self, context, output):
        branch = self.reuse.branches.get(context.branch)
        step = context.step_index
        if branch is None or branch.decisions.get(step) is not False or branch.last_computed is None:
            return None
        scale = self.policy.output_scale(context.branch, step, step - branch.last_computed, context.num_steps)
        return None if scale == 1.0 else _with_sample(output, _sample(output) * scale)


def apply(model: torch.nn.Module, config: ERTACacheConfig) -> Handle:
    data = calibration.load(model, TECHNIQUE, config.calibration)
    if (config.rectify or config.adjust_timesteps) and config.max_age > data["max_age"]:
        raise ValueError(
            f"ertacache: max_age={config.max_age} exceeds the calibrated max_age={data['max_age']}; lower it, or "
            "recalibrate with a larger max_age"
        )
    policy = ERTACache(config, data, _load_rectification(model, config, data) if config.rectify else None)
    reuse = StepReuse(model, policy, f"cadence.{TECHNIQUE}")
    scale = _OutputScale(reuse, policy) if config.adjust_timesteps else None
    if scale:
        reuse.context.add_interceptor(scale, first=True)  # first: CFG reuse then sees the scaled cond output

    def remove():
        if scale:
            reuse.context.remove_interceptor(scale)
        reuse.remove()

    return Handle(config, remove, reuse.stats)


register(ERTACacheConfig, apply, Calibration(TECHNIQUE, calibrate, describe_calibration))

__all__ = ["ERTACacheConfig", "apply", "calibrate", "describe_calibration", "fit_affine", "resample"]
