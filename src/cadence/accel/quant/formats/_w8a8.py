"""What FP8 and INT8 W8A8 share: activations quantized per token (or with one calibrated
per-tensor scale, ``act_scale``) by the weight's own rounding, then an 8-bit GEMM.

The reference path emulates the fast path's rounding (quantize, dequantize, matmul in fp32),
so the two agree to accumulation order. Activations are quantized by the one-pass Triton
kernel in eager CUDA runs; compiled (cadence's compile technique), by the plain torch ops
below, which inductor fuses into the op that produces x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cadence.accel.quant.formats._base import TINY, PerChannelFormat, absmax_scale


class W8A8Format(PerChannelFormat):
    """A subclass sets ``code_dtype``, ``qmax`` and ``quantize``, and runs its GEMM in
    :meth:`native_matmul`."""

    w8a8 = True
    fuses_bias = True
    code_dtype: torch.dtype

    def static_activation_scale(self, absmax: float, device: torch.device) -> torch.Tensor:
        """(1,) fp32 per-tensor activation scale from the calibrated max |x / smooth|."""
        return torch.tensor([max(absmax, TINY) / self.qmax], device=device)

    def fast_path(self, device):
        if device.type != "cuda":
            return False, f"{self.name}: no fast kernel on {device.type}; the reference path runs"
        return True, ""

    def runs_native(self, rows: int, device: torch.device) -> bool:
        """Whether a native layer's GEMM takes ``rows`` rows (some kernels refuse few)."""
        return True

    def native_matmul(self, layer, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                      dtype: torch.dtype) -> torch.Tensor:
        """q (rows, in) codes, scale (rows, 1) -> (rows, out) in ``dtype``, bias added."""
        raise NotImplementedError

    def matmul(self, layer, x2):
        static = getattr(layer, "act_scale", None)
        rows = x2.shape[0]
        native = layer.native and self.runs_native(rows, x2.device)
        fused_check = False
        if native and x2.is_cuda and not torch.compiler.is_compiling():
            from cadence.accel.quant._kernels import quantize_rows

            q, scale, amax = quantize_rows(x2, self.code_dtype, self.qmax, getattr(layer, "inv_smooth", None),
                                           static, layer.monitor)
            fused_check = True
        else:
            smoothed = layer.smoothed(x2)
            amax = smoothed.abs().amax(dim=-1).float()
            scale = static.reshape(1, 1).expand(rows, 1) if static is not None else absmax_scale(smoothed, self.qmax)
            q = self.quantize(smoothed, scale)
        if layer.monitor is not None and not fused_check:
            layer.report_finite(amax)
        bias = getattr(layer, "bias", None)
        if native:
            return self.native_matmul(layer, q, scale, bias, x2.dtype)
        y = F.linear(q.float() * scale, layer.weight.float() * layer.weight_scale.reshape(-1, 1))
        if bias is not None:
            y = y + bias.float()
        return y.to(x2.dtype)
