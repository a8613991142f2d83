"""``QuantLinear``: a linear layer whose weight is stored quantized in one of the number
formats of :mod:`cadence.accel.quant.formats` (the table of formats is there), with a fast
path on the GPU and a plain PyTorch reference path everywhere. The format quantizes the
weight and runs the matmul; the layer adds what is the same in every format:

SmoothQuant (``smooth``): activations are divided per input channel by s and the weight
multiplied by it before quantizing, moving outliers from activations to weights. SVDQuant
(``rank``): the (smoothed) weight's top singular directions stay in full precision as a
low-rank branch ``x @ down.T @ up.T`` and only the residual is quantized. A static
activation scale (``static_absmax``) replaces W8A8's per-token one. ``monitor``: a flag the
layer clears when NaN or Inf enters it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cadence.accel.quant.formats import get_format, nbytes

KERNELS = ("auto", "native", "reference")


class QuantLinear(torch.nn.Module):
    """Drop-in for ``torch.nn.Linear`` (inference only). Build with :meth:`from_linear`, or
    from saved tensors with the constructor."""

    def __init__(self, in_features: int, out_features: int, mode: str, tensors: dict[str, torch.Tensor],
                 dtype: torch.dtype, group: int = 128, kernel: str = "auto"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.mode, self.group, self.kernel, self.dtype = mode, group, kernel, dtype
        self.format = get_format(mode)
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)
        self.monitor = None  # set by install: a (1,) uint8 view this layer's NaN/Inf check writes 0 to
        device = next(iter(tensors.values())).device
        # torch._scaled_mm and torch._int_mm need both sizes multiples of 16.
        shapes_fit = in_features % 16 == 0 and out_features % 16 == 0
        self.native = shapes_fit and (kernel == "native" or (kernel == "auto" and self.format.fast_path(device)[0]))

    # -- building ----------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, mode: str, *, group: int = 128, smooth: torch.Tensor | None = None,
                    static_absmax: float | None = None, rank: int = 0, kernel: str = "auto") -> "QuantLinear":
        """Quantize ``linear``. ``smooth`` (in_features,) SmoothQuant factors; ``static_absmax``
        the calibrated max |x / smooth| (a per-tensor activation scale; None: per token)."""
        fmt = get_format(mode)
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
        tensors.update(fmt.quantize_weight(weight, group))
        if static_absmax is not None and fmt.w8a8:
            tensors["act_scale"] = fmt.static_activation_scale(static_absmax, weight.device)
        if linear.bias is not None:
            tensors["bias"] = linear.bias.detach().clone()
        return cls(linear.in_features, linear.out_features, mode, tensors, linear.weight.dtype, group, kernel)

    @property
    def weight_bytes(self) -> int:
        return nbytes(dict(self.named_buffers()))

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the quantized matmul uses, in ``dtype`` (low-rank branch and smoothing
        not included: those act on the input)."""
        return self.format.dequantize_weight(self, dtype)

    # -- running -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        y = self.format.matmul(self, x2)
        if hasattr(self, "lora_up"):
            low_rank = F.linear(F.linear(self.smoothed(x2).to(self.lora_down.dtype), self.lora_down), self.lora_up)
            y = y + low_rank.to(y.dtype)
        if hasattr(self, "bias") and not self.format.fuses_bias:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def smoothed(self, x2: torch.Tensor) -> torch.Tensor:
        """x / s (SmoothQuant); the fast W8A8 path does this inside its quantizer instead."""
        return x2 * self.inv_smooth.to(x2.dtype) if hasattr(self, "inv_smooth") else x2

    def report_finite(self, amax: torch.Tensor) -> None:
        """Clear ``monitor`` when ``amax`` (of this layer's input) is NaN or Inf."""
        self.monitor.copy_(torch.isfinite(amax).all().reshape(1))  # stays on the device: no sync per call

    def extra_repr(self) -> str:
        extras = [name for name in ("inv_smooth", "act_scale", "lora_up") if hasattr(self, name)]
        return (f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, "
                f"native={self.native}" + (f", with {', '.join(extras)}" if extras else ""))
