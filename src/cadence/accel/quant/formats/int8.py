"""``int8``: INT8 weights (per output channel) and activations (per token, or one
calibrated scale per tensor), the GEMM through ``torch._int_mm`` with a one-pass Triton
epilogue on CUDA. SmoothQuant (the technique's ``smooth``) keeps INT8's uniform grid from
losing the small values of outlier channels."""

from __future__ import annotations

import torch

from cadence.accel.quant.formats._base import register_format
from cadence.accel.quant.formats._w8a8 import W8A8Format

INT8_MAX = 127.0


def quantize_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


class Int8Format(W8A8Format):
    name = "int8"
    code_dtype = torch.int8
    qmax = INT8_MAX

    def quantize(self, x, scale):
        return quantize_int8(x, scale)

    def runs_native(self, rows, device):
        # torch._int_mm on CUDA needs more than 16 rows; the modulation and pooled-text
        # linears (one row per sample) take the reference path.
        return rows > 16 or device.type != "cuda"

    def native_matmul(self, layer, q, scale, bias, dtype):
        if q.is_cuda:
            from cadence.accel.quant._kernels import dequantize_int32

            return dequantize_int32(torch._int_mm(q, layer.weight.t()), scale, layer.weight_scale, bias, dtype)
        y = torch._int_mm(q, layer.weight.t()).float() * (scale * layer.weight_scale)
        if bias is not None:
            y = y + bias.float()
        return y.to(dtype)


register_format(Int8Format())
