"""What every quantization technique shares: the config fields, choosing the linears,
swapping them for :class:`QuantLinear` and back, and the NaN/Inf check.

The float linears are kept (moved to the CPU when ``offload``, so the GPU memory is really
freed) and put back by ``remove()``: the model comes back bit-identical.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from cadence.accel.calibration import model_identity
from cadence.accel.quant import calibration
from cadence.accel.quant.formats import get_format, nbytes
from cadence.accel.quant.linear import KERNELS, QuantLinear
from cadence.accel.registry import Handle, TechniqueConfig, param
from cadence.context import attach_context, detach_context
from cadence.models import quantizable_linears

TIMESTEP_PATHS = ("full", "quantize")
ACTIVATIONS = ("dynamic", "static")
GROUPS = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class QuantConfig(TechniqueConfig):
    """Fields every quantization technique has."""

    level = "bit"

    timestep_path: str = param("full", "full: the AdaLN modulation linears (fed by the timestep embedding) stay in "
                                       "full precision, as TFMQ-DM advises; quantize: they are quantized too",
                               choices=TIMESTEP_PATHS)
    calibration: str = param("", "activation calibration file (default: calibration/activations.json beside the model)")
    checkpoint: str = param("", "load quantized weights saved by `cadence quantize` instead of quantizing")
    offload: bool = param(True, "move the float weights to the CPU while quantized (frees their GPU memory; remove() "
                                "restores)")
    kernel: str = param("auto", "native: the fast kernel; reference: its plain PyTorch emulation; auto: native where "
                                "it runs", choices=KERNELS)
    check_finite: bool = param(True, "raise on NaN/Inf entering a quantized layer (one device sync per transformer "
                                     "forward)")

    mode: ClassVar[str]  # the QuantLinear mode of every layer (mixed: chosen per layer)

    @property
    def needs_calibration(self) -> bool:
        return getattr(self, "smooth", 0.0) > 0 or getattr(self, "activations", "dynamic") == "static"


def smooth_param(default: float, needs: str) -> float:
    """SmoothQuant's migration strength alpha (0: off), shared by the W8A8 and FP4 configs."""
    return param(default, f"SmoothQuant migration strength alpha (0: off; > 0 {needs})", low=0, high=1)


def unsupported(linear: torch.nn.Linear, mode: str, group: int) -> str:
    """Why ``linear`` cannot take ``mode`` (empty if it can)."""
    step = get_format(mode).group_size(group)
    if linear.in_features % step:
        return f"{mode} quantizes groups of {step} input channels; {linear.in_features} is not a multiple"
    return ""


def _set_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def refuse_second(model: torch.nn.Module, config: TechniqueConfig) -> None:
    other = getattr(model, "_cadence_quantization", None)
    if other is not None:
        raise ValueError(
            f"{config.name}: the model is already quantized by {other.config}; a model takes one quantization "
            "technique: remove the other first, or use `mixed` for a precision per layer"
        )


class Quantization:
    """The swapped linears of one application, the finiteness check, and remove()."""

    def __init__(self, model: torch.nn.Module, config: QuantConfig, plan: dict[str, dict],
                 saved: dict[str, dict[str, torch.Tensor]] | None = None):
        self.model, self.config = model, config
        self.originals: dict[str, tuple[torch.nn.Linear, torch.device]] = {}
        self.skipped: dict[str, str] = {}
        self.modes: dict[str, str] = {}
        self.float_bytes = sum(nbytes(dict(m.named_parameters())) for m in
                               quantizable_linears(model, config.timestep_path).values())
        self.context = None
        self.flags = None
        self._warned: set[str] = set()
        self.identity = model_identity(model)  # of the float model: what a saved checkpoint is tied to
        model._cadence_quantization = self
        try:
            self._swap(plan, saved)
        except Exception:
            self.remove()
            raise
        if config.check_finite and self.modes:
            device = next(next(iter(self._quantized().values())).buffers()).device
            self.flags = torch.ones(len(self.modes), dtype=torch.uint8, device=device)  # 0: NaN/Inf seen
            # Each layer writes its own element: a view, not (flags, index), since a compiled
            # block would specialise on the index and compile once per layer.
            for index, module in enumerate(self._quantized().values()):
                module.monitor = self.flags[index:index + 1]
            self.context = attach_context(model)
            self.context.add_interceptor(self)

    def _quantized(self) -> dict[str, QuantLinear]:
        return {name: self.model.get_submodule(name) for name in self.modes}

    def _swap(self, plan: dict[str, dict], saved) -> None:
        linears = quantizable_linears(self.model, self.config.timestep_path)
        items = [(name, options) for name, options in plan.items() if options["mode"] != "none"]
        large = sum(linears[name].weight.numel() for name, _ in items) > 50_000_000
        for name, options in tqdm(items, desc=f"quantize {self.config.name}", unit="layer", disable=not large):
            linear = linears[name]
            mode = options["mode"]
            reason = unsupported(linear, mode, options.get("group", 128))
            if reason:
                self.skipped[name] = reason
                continue
            available, why = get_format(mode).fast_path(linear.weight.device)  # why: only formats with a kernel
            if not available and why and self.config.kernel == "auto" and why not in self._warned:
                self._warned.add(why)
                warnings.warn(f"{why} (same numerics, no speedup)", stacklevel=4)
            with torch.no_grad():
                if saved is not None:
                    tensors = {k: v.to(linear.weight.device) for k, v in saved[name].items()}
                    module = QuantLinear(linear.in_features, linear.out_features, mode, tensors,
                                         linear.weight.dtype, options.get("group", 128), self.config.kernel)
                else:
                    module = QuantLinear.from_linear(linear, mode, kernel=self.config.kernel, **{
                        k: v for k, v in options.items() if k != "mode"})
            device = linear.weight.device
            if self.config.offload and device.type != "cpu":
                linear.to("cpu")
            self.originals[name] = (linear, device)
            _set_module(self.model, name, module)
            self.modes[name] = mode

    # -- the step context's interceptor: a NaN/Inf check per transformer forward --------
    def before(self, context, args, kwargs):
        return None

    def after(self, context, output):
        if self.flags is not None and not bool(self.flags.all()):
            names = list(self.modes)
            bad = [names[i] for i in (self.flags == 0).nonzero().flatten().tolist()]
            self.flags.fill_(1)
            raise FloatingPointError(
                f"{self.config.name}: NaN or Inf entered quantized layer(s) {', '.join(bad[:4])}"
                f"{' and %d more' % (len(bad) - 4) if len(bad) > 4 else ''} at step {context.step_index} "
                f"({context.branch} branch): a quantized layer would turn them into wrong finite values, so "
                "the output is refused. Check the inputs (latents, prompt embeddings) or run without quantization."
            )
        return None

    def remove(self) -> None:
        for name, (linear, device) in reversed(list(self.originals.items())):
            linear.to(device)
            _set_module(self.model, name, linear)
        self.originals.clear()
        if getattr(self.model, "_cadence_quantization", None) is self:
            del self.model._cadence_quantization
        if self.context is not None:
            self.context.remove_interceptor(self)
            detach_context(self.model)
            self.context = None

    def stats(self) -> dict:
        quantized = self._quantized() if self.originals else {}
        bytes_now = sum(m.weight_bytes for m in quantized.values())
        float_kept = sum(nbytes(dict(m.named_parameters())) for m in
                         quantizable_linears(self.model, self.config.timestep_path).values())
        counts: dict[str, int] = {}
        for mode in self.modes.values():
            counts[mode] = counts.get(mode, 0) + 1
        return {
            "quantized_layers": counts,
            "skipped_layers": dict(self.skipped),
            "linear_bytes_float": self.float_bytes,
            "linear_bytes": bytes_now + float_kept,
            "weight_memory_saved": 1 - (bytes_now + float_kept) / self.float_bytes if self.float_bytes else 0.0,
            "native_kernels": sum(m.native for m in quantized.values()),
        }


def uniform_plan(model: torch.nn.Module, config: QuantConfig, mode: str) -> dict[str, dict]:
    """Every quantizable linear in ``mode``, with the calibrated smoothing and static scale
    where the config asks for them."""
    linears = quantizable_linears(model, config.timestep_path)
    stats = calibration.load_activations(model, config.calibration) if config.needs_calibration else None
    plan = {}
    for name, linear in linears.items():
        options: dict = {"mode": mode}
        if hasattr(config, "group"):
            options["group"] = config.group
        if getattr(config, "rank", 0):
            options["rank"] = config.rank
        if stats is not None:
            channel_absmax = stats.channel_absmax(name, linear.weight.device)
            smooth = None
            if getattr(config, "smooth", 0.0) > 0:
                smooth = calibration.smoothing_factors(channel_absmax, linear.weight.detach(), config.smooth)
                options["smooth"] = smooth
            if getattr(config, "activations", "") == "static" and get_format(mode).w8a8:
                options["static_absmax"] = float((channel_absmax / (smooth if smooth is not None else 1.0)).max())
        plan[name] = options
    return plan


def install(model: torch.nn.Module, config: QuantConfig, plan: dict[str, dict] | None = None) -> Handle:
    refuse_second(model, config)
    from cadence.accel.quant import checkpoint

    saved = None
    if config.checkpoint:
        plan, saved = checkpoint.read(model, config)
    elif plan is None:
        plan = uniform_plan(model, config, config.mode)
    quantization = Quantization(model, config, plan, saved)
    return Handle(config, quantization.remove, quantization.stats)
