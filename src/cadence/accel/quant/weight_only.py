"""Weight-only quantization, for memory: the weight is stored in 8 or 4 bits and
dequantized to the layer's dtype for the matmul (activations are not touched).

INT8 is symmetric per output channel; INT4 asymmetric (scale and offset in fp16) per
group of ``group`` input channels, two codes a byte: 4.25 bits a weight at group 128.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cadence.accel.quant._base import GROUPS, QuantConfig, install
from cadence.accel.registry import Handle, param, register


@dataclass(frozen=True)
class WeightInt8Config(QuantConfig):
    name = "weight-int8"
    summary = "INT8 weights (per channel), activations untouched: half the weight memory"
    mode = "weight-int8"


@dataclass(frozen=True)
class WeightInt4Config(QuantConfig):
    name = "weight-int4"
    summary = "INT4 weights, asymmetric per group: about a quarter of the weight memory"
    mode = "weight-int4"

    group: int = param(128, "input channels per scale", choices=GROUPS)


def apply(model: torch.nn.Module, config: QuantConfig) -> Handle:
    return install(model, config)


register(WeightInt8Config, apply)
register(WeightInt4Config, apply)

__all__ = ["WeightInt4Config", "WeightInt8Config", "apply"]
