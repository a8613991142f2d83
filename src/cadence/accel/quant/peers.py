"""torchao's quantization configurations as peers, on the same linears and the same runs
as cadence's own: ``torchao-float8`` (FP8 e4m3 weights and per-token activations, per-row
scales, ``Float8DynamicActivationFloat8WeightConfig(PerRow())``) and ``torchao-int8``
(INT8 per-token activations and per-channel weights, ``Int8DynamicActivationInt8WeightConfig``).

torchao swaps each weight for a quantized tensor subclass in place; the handle keeps the
float weights (on the CPU when ``offload``) and puts them back, so ``remove()`` is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cadence.accel.calibration import model_identity
from cadence.accel.quant._base import QuantConfig, refuse_second
from cadence.accel.registry import Handle, register
from cadence.models import quantizable_linears


def _torchao_config(name: str):
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int8DynamicActivationInt8WeightConfig,
            PerRow,
        )
    except ImportError as error:
        raise ValueError(f"{name} needs torchao (pip install torchao): {error}") from None
    if name == "torchao-float8":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    return Int8DynamicActivationInt8WeightConfig()


@dataclass(frozen=True)
class TorchaoFloat8Config(QuantConfig):
    name = "torchao-float8"
    summary = "peer: torchao's Float8DynamicActivationFloat8WeightConfig(PerRow()) on the same linears"
    mode = "fp8"


@dataclass(frozen=True)
class TorchaoInt8Config(QuantConfig):
    name = "torchao-int8"
    summary = "peer: torchao's Int8DynamicActivationInt8WeightConfig on the same linears"
    mode = "int8"


class _Peer:
    def __init__(self, model: torch.nn.Module, config: QuantConfig):
        from torchao.quantization import quantize_

        self.model, self.config = model, config
        self.identity = model_identity(model)
        targets = quantizable_linears(model, config.timestep_path)
        self.originals = {name: (linear, linear.weight) for name, linear in targets.items()}
        self.devices = {name: linear.weight.device for name, linear in targets.items()}
        try:
            quantize_(model, _torchao_config(config.name), filter_fn=lambda module, fqn: fqn in targets)
        except (AssertionError, NotImplementedError, RuntimeError) as error:
            self.remove()
            raise ValueError(f"{config.name} does not run on {next(iter(self.devices.values()))}: {error}") from None
        if config.offload:
            for name, (linear, weight) in self.originals.items():
                self.originals[name] = (linear, torch.nn.Parameter(weight.detach().cpu(), requires_grad=False))
        model._cadence_quantization = self

    def remove(self) -> None:
        for name, (linear, weight) in self.originals.items():
            linear.weight = torch.nn.Parameter(weight.detach().to(self.devices[name]), requires_grad=False)
        self.originals.clear()
        if getattr(self.model, "_cadence_quantization", None) is self:
            del self.model._cadence_quantization

    def stats(self) -> dict:
        return {"quantized_layers": {self.config.name: len(self.originals)}}


def apply(model: torch.nn.Module, config: QuantConfig) -> Handle:
    refuse_second(model, config)
    _torchao_config(config.name)  # refuse early, with the reason, when torchao is missing
    peer = _Peer(model, config)
    return Handle(config, peer.remove, peer.stats)


register(TorchaoFloat8Config, apply)
register(TorchaoInt8Config, apply)

__all__ = ["TorchaoFloat8Config", "TorchaoInt8Config", "apply"]
