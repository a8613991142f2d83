"""W8A8: weights and activations in 8 bits, the matmul on 8-bit tensor cores.

``fp8``: FP8 e4m3 through ``torch._scaled_mm`` (H100: 1391 against 774 TFLOP/s in bf16).
``int8``: INT8 through ``torch._int_mm`` (948 TOP/s), with SmoothQuant's scale migration,
on by default because INT8's uniform grid loses the small values of outlier channels.
Activation scales are per token, computed on the fly (``activations=dynamic``), or one per
tensor from the calibration (``static``), the maximum over every calibrated timestep.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cadence.accel.quant._base import ACTIVATIONS, QuantConfig, install, smooth_param
from cadence.accel.quant.calibration import ACTIVATION_RANGES
from cadence.accel.registry import Handle, param, register

_ACTIVATIONS_HELP = "dynamic: a scale per token; static: one per tensor, from the activation calibration"
_SMOOTH_NEEDS = "needs the activation calibration"


@dataclass(frozen=True)
class FP8Config(QuantConfig):
    name = "fp8"
    summary = "FP8 e4m3 weights (per channel) and activations (per token), torch._scaled_mm"
    mode = "fp8"

    activations: str = param("dynamic", _ACTIVATIONS_HELP, choices=ACTIVATIONS)
    smooth: float = smooth_param(0.0, _SMOOTH_NEEDS)


@dataclass(frozen=True)
class Int8Config(FP8Config):
    name = "int8"
    summary = "INT8 weights and activations with SmoothQuant migration, torch._int_mm"
    mode = "int8"

    # 0.5: SmoothQuant's default, balanced difficulty between weights and activations.
    smooth: float = smooth_param(0.5, _SMOOTH_NEEDS)


def apply(model: torch.nn.Module, config: QuantConfig) -> Handle:
    return install(model, config)


register(FP8Config, apply, ACTIVATION_RANGES)
register(Int8Config, apply, ACTIVATION_RANGES)

__all__ = ["FP8Config", "Int8Config", "apply"]
