"""NVFP4 and MXFP4 (W4A4), simulated: Hopper has no FP4 tensor cores, so cadence stores
the packed E2M1 codes and block scales (the memory is real: 4.5 and 4.25 bits a weight) and
runs the matmul in the layer's dtype on dequantized values, activations fake-quantized the
same way per block of the input channels. What it measures is the accuracy that FP4
hardware (Blackwell) would give.

``rank > 0`` adds SVDQuant's low-rank branch: the top ``rank`` singular directions of the
(smoothed) weight stay in full precision and absorb the outliers; only the residual is
quantized. ``smooth`` migrates activation outliers into the weight first, as SVDQuant does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cadence.accel.quant._base import QuantConfig, install, smooth_param
from cadence.accel.quant.calibration import ACTIVATION_RANGES
from cadence.accel.registry import Handle, param, register


@dataclass(frozen=True)
class _FP4Config(QuantConfig):
    rank: int = param(0, "SVDQuant low-rank branch kept in full precision (0: off; 32 in the paper)", low=0, high=256)
    smooth: float = smooth_param(0.0, "needs the activation calibration")


@dataclass(frozen=True)
class NVFP4Config(_FP4Config):
    name = "nvfp4"
    summary = "NVFP4 W4A4 (E2M1, 16-blocks, FP8 scales), simulated; optional SVDQuant low-rank branch"
    mode = "nvfp4"


@dataclass(frozen=True)
class MXFP4Config(_FP4Config):
    name = "mxfp4"
    summary = "MXFP4 W4A4 (E2M1, 32-blocks, power-of-two scales), simulated; optional SVDQuant low-rank branch"
    mode = "mxfp4"


def apply(model: torch.nn.Module, config: QuantConfig) -> Handle:
    return install(model, config)


register(NVFP4Config, apply, ACTIVATION_RANGES)
register(MXFP4Config, apply, ACTIVATION_RANGES)

__all__ = ["MXFP4Config", "NVFP4Config", "apply"]
