"""``QuantLinear``: a linear layer whose weight is stored quantized, in one of cadence's
modes, with a fast path on the GPU and a plain PyTorch reference path everywhere.

| mode | weight | activations | fast path (CUDA) |
|---|---|---|---|
| ``fp8`` | FP8 e4m3, per output channel | FP8, per token (dynamic) or per tensor (static) | ``torch._scaled_mm`` (sm89+) |
| ``int8`` | INT8, per output channel | INT8, per token or per tensor | ``torch._int_mm`` |
| ``weight-int8`` | INT8, per output channel | layer dtype | dequantize + matmul |
| ``weight-int4`` / ``weight-int2`` | INT4 / INT2, asymmetric per group | layer dtype | dequantize + matmul |
| ``nvfp4`` / ``mxfp4`` | E2M1 + block scales (packed) | fake-quantized the same way | simulated (no FP4 units on Hopper) |

SmoothQuant (``smooth``): activations are divided per input channel by s and the weight
multiplied by it before quantizing, moving outliers from activations to weights. SVDQuant
(``rank``): the (smoothed) weight's top singular directions stay in full precision as a
low-rank branch ``x @ down.T @ up.T`` and only the residual is quantized.

The reference path emulates the fast path's rounding (quantize, dequantize, matmul in fp32),
so the two agree to accumulation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cadence.accel.quant import formats
from cadence.accel.quant.formats import FP8_MAX, INT8_MAX

# mode -> weight bits (what the memory accounting and the allocator see)
MODES: dict[str, int] = {
    "fp8": 8, "int8": 8, "weight-int8": 8, "weight-int4": 4, "weight-int2": 2, "nvfp4": 4, "mxfp4": 4,
}
W8A8 = ("fp8", "int8")
GROUPWISE_BITS = {"weight-int4": 4, "weight-int2": 2}
KERNELS = ("auto", "native", "reference")


def group_of(mode: str, group: int) -> int:
    """The input-channel group a mode's weight is quantized in (1: per channel)."""
    return formats.FP4_GROUP.get(mode, group if mode in GROUPWISE_BITS else 1)


def fast_path_available(mode: str, device: torch.device) -> tuple[bool, str]:
    """Whether ``mode`` has a native kernel on ``device``; if not, why."""
    if mode not in W8A8:
        return False, ""
    if device.type != "cuda":
        return False, f"{mode}: no fast kernel on {device.type}; the reference path runs"
    if mode == "fp8" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return False, f"fp8: {name} has no FP8 tensor cores (needs sm89+); the reference path runs"
    return True, ""


class QuantLinear(torch.nn.Module):
    """Drop-in for ``torch.nn.Linear`` (inference only). Build with :meth:`from_linear`, or
    from saved tensors with the constructor."""

    def __init__(self, in_features: int, out_features: int, mode: str, tensors: dict[str, torch.Tensor],
                 dtype: torch.dtype, group: int = 128, kernel: str = "auto"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.mode, self.group, self.kernel, self.dtype = mode, group, kernel, dtype
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)
        self.monitor = None  # set by install: a (1,) uint8 view this layer's NaN/Inf check writes 0 to
        device = next(iter(tensors.values())).device
        # torch._scaled_mm and torch._int_mm need both sizes multiples of 16.
        shapes_fit = in_features % 16 == 0 and out_features % 16 == 0
        self.native = shapes_fit and (kernel == "native" or (kernel == "auto" and fast_path_available(mode, device)[0]))

    # -- building ----------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, mode: str, *, group: int = 128, smooth: torch.Tensor | None = None,
                    static_absmax: float | None = None, rank: int = 0, kernel: str = "auto") -> "QuantLinear":
        """Quantize ``linear``. ``smooth`` (in_features,) SmoothQuant factors; ``static_absmax``
        the calibrated max |x / smooth| (a per-tensor activation scale; None: per token)."""
        weight = linear.weight.detach().float()
        tensors: dict[str, torch.Tensor] = {}
        if smooth is not None:
            smooth = smooth.to(weight.device, torch.float32)
            weight = weight * smooth  # W' = W diag(s), so x W^T = (x / s) W'^T
            tensors["inv_smooth"] = 1.0 / smooth
        if rank:
            u, s, vh = torch.linalg.svd(weight, full_matrices=False)
            up, down = u[:, :rank] * s[:rank], vh[:rank]  # (out, r), (r, in)
            weight = weight - up @ down
            # contiguous copies: a view of vh would keep all of it alive, and compute
            # differently from the same values loaded back from a checkpoint
            tensors["lora_up"] = up.to(linear.weight.dtype).contiguous()
            tensors["lora_down"] = down.to(linear.weight.dtype).contiguous().clone()
        if mode in ("fp8", "int8", "weight-int8"):
            qmax = FP8_MAX if mode == "fp8" else INT8_MAX
            scale = formats.absmax_scale(weight, qmax)  # (out, 1)
            quantize = formats.quantize_fp8 if mode == "fp8" else formats.quantize_int8
            tensors["weight"] = quantize(weight, scale)
            tensors["weight_scale"] = scale.reshape(1, -1).contiguous()  # (1, out): _scaled_mm's scale_b
        elif mode in GROUPWISE_BITS:
            tensors.update(formats.quantize_groupwise(weight, GROUPWISE_BITS[mode], group))
        elif mode in formats.FP4_GROUP:
            tensors.update(formats.quantize_fp4(weight, mode))
        else:
            raise ValueError(f"unknown quantization mode {mode!r}; valid: {', '.join(MODES)}")
        if static_absmax is not None and mode in W8A8:
            qmax = FP8_MAX if mode == "fp8" else INT8_MAX
            tensors["act_scale"] = torch.tensor([max(static_absmax, formats.TINY) / qmax], device=weight.device)
        if linear.bias is not None:
            tensors["bias"] = linear.bias.detach().clone()
        return cls(linear.in_features, linear.out_features, mode, tensors, linear.weight.dtype, group, kernel)

    @property
    def weight_bytes(self) -> int:
        return formats.nbytes(dict(self.named_buffers()))

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the quantized matmul uses, in ``dtype`` (low-rank branch and smoothing
        not included: those act on the input)."""
        if self.mode in ("fp8", "int8", "weight-int8"):
            return (self.weight.float() * self.weight_scale.reshape(-1, 1)).to(dtype)
        if self.mode in GROUPWISE_BITS:
            return formats.dequantize_groupwise(dict(codes=self.codes, scale=self.scale, offset=self.offset),
                                                GROUPWISE_BITS[self.mode], dtype)
        tensors = {name: getattr(self, name) for name in ("codes", "block_scale", "tensor_scale") if hasattr(self, name)}
        return formats.dequantize_fp4(tensors, self.mode, dtype)

    # -- running -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.mode in W8A8:
            y = self._w8a8(x2)
        else:
            if self.monitor is not None:
                self._report_finite(x2.abs().amax())
            inputs = self._smoothed(x2)
            if self.mode in formats.FP4_GROUP:
                inputs = formats.fake_fp4(inputs, self.mode)
            y = F.linear(inputs, self.dequantized_weight(x.dtype))
        if hasattr(self, "lora_up"):
            low_rank = F.linear(F.linear(self._smoothed(x2).to(self.lora_down.dtype), self.lora_down), self.lora_up)
            y = y + low_rank.to(y.dtype)
        if hasattr(self, "bias") and self.mode not in W8A8:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def _smoothed(self, x2: torch.Tensor) -> torch.Tensor:
        """x / s (SmoothQuant); the fast W8A8 path does this inside its quantizer instead."""
        return x2 * self.inv_smooth.to(x2.dtype) if hasattr(self, "inv_smooth") else x2

    def _w8a8(self, x2: torch.Tensor) -> torch.Tensor:
        static = getattr(self, "act_scale", None)
        rows = x2.shape[0]
        # torch._int_mm on CUDA needs more than 16 rows; the modulation and pooled-text
        # linears (one row per sample) take the reference path.
        native = self.native and (self.mode == "fp8" or rows > 16 or x2.device.type != "cuda")
        fused_check = False
        # Compiled (cadence's compile technique), the plain torch quantization below is fused
        # by inductor into the op that produces x; eager, the Triton quantizer is one pass.
        if native and x2.is_cuda and not torch.compiler.is_compiling():
            from cadence.accel.quant._kernels import quantize_rows

            flag = self.monitor
            q, scale, amax = quantize_rows(x2, self.mode, getattr(self, "inv_smooth", None), static, flag)
            fused_check = True
        else:
            qmax = FP8_MAX if self.mode == "fp8" else INT8_MAX
            smoothed = self._smoothed(x2)
            amax = smoothed.abs().amax(dim=-1).float()
            scale = static.reshape(1, 1).expand(rows, 1) if static is not None else formats.absmax_scale(smoothed, qmax)
            quantize = formats.quantize_fp8 if self.mode == "fp8" else formats.quantize_int8
            q = quantize(smoothed, scale)
        if self.monitor is not None and not fused_check:
            self._report_finite(amax)
        bias = getattr(self, "bias", None)
        if native and self.mode == "fp8":
            out_dtype = x2.dtype if x2.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
            y = torch._scaled_mm(q, self.weight.t(), scale_a=scale.contiguous(), scale_b=self.weight_scale,
                                 bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype,
                                 use_fast_accum=True)
            return y.to(x2.dtype)
        if native and x2.is_cuda:  # int8
            from cadence.accel.quant._kernels import dequantize_int32

            return dequantize_int32(torch._int_mm(q, self.weight.t()), scale, self.weight_scale, bias, x2.dtype)
        if native:
            y = torch._int_mm(q, self.weight.t()).float() * (scale * self.weight_scale)
        else:
            y = F.linear(q.float() * scale, self.weight.float() * self.weight_scale.reshape(-1, 1))
        if bias is not None:
            y = y + bias.float()
        return y.to(x2.dtype)

    def _report_finite(self, amax: torch.Tensor) -> None:
        self.monitor.copy_(torch.isfinite(amax).all().reshape(1))  # stays on the device: no sync per call

    def extra_repr(self) -> str:
        extras = [name for name in ("inv_smooth", "act_scale", "lora_up") if hasattr(self, name)]
        return (f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, "
                f"native={self.native}" + (f", with {', '.join(extras)}" if extras else ""))
