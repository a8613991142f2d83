"""``fp8``: FP8 e4m3 weights (per output channel) and activations (per token, or one
calibrated scale per tensor), the GEMM through ``torch._scaled_mm`` on sm89+ tensor cores."""

from __future__ import annotations

import torch

from cadence.accel.quant.formats._base import register_format
from cadence.accel.quant.formats._w8a8 import W8A8Format

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


class FP8Format(W8A8Format):
    name = "fp8"
    code_dtype = FP8
    qmax = FP8_MAX

    def quantize(self, x, scale):
        return quantize_fp8(x, scale)

    def fast_path(self, device):
        available, why = super().fast_path(device)
        if available and torch.cuda.get_device_capability(device) < (8, 9):
            name = torch.cuda.get_device_name(device)
            return False, f"fp8: {name} has no FP8 tensor cores (needs sm89+); the reference path runs"
        return available, why

    def native_matmul(self, layer, q, scale, bias, dtype):
        out_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        y = torch._scaled_mm(q, layer.weight.t(), scale_a=scale.contiguous(), scale_b=layer.weight_scale,
                             bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype,
                             use_fast_accum=True)
        return y.to(dtype)


register_format(FP8Format())
