"""The contract a number format fulfils, the registry ``QuantLinear`` dispatches through,
and the arithmetic every format shares (absmax scales, bit packing, byte counts).

A format is a stateless object: it turns a float weight into the tensors a layer stores,
and runs the layer's matmul from them. The layer (a ``QuantLinear``) holds those tensors
as buffers and hands itself to the format, so a format reads ``layer.<tensor>`` and the
few things the layer owns (``native``, ``monitor``, ``smoothed``, ``report_finite``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TINY = 1e-12  # floor of a scale, so an all-zero row quantizes to zeros, not NaN


class Format:
    """One number format. Subclass, set ``name`` and ``bits``, implement the three weight
    methods, and :func:`register_format` an instance; the defaults are a weight-only format
    (activations untouched, weight dequantized to the layer's dtype for the matmul)."""

    name: str = ""
    bits: int = 0  # bits a weight code carries (the bytes stored, scales included: stored_bytes())
    # Weights and activations in 8 bits through an 8-bit GEMM: activations get a scale per
    # token, or a calibrated one per tensor (``activations=static``: static_activation_scale(),
    # see _w8a8.W8A8Format).
    w8a8: bool = False
    fuses_bias: bool = False  # matmul() adds the bias itself (in the GEMM or its epilogue)

    # -- the weight ----------------------------------------------------------------------
    def quantize_weight(self, weight: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
        """(out, in) fp32 weight (already smoothed, low-rank part removed) -> the tensors the
        layer stores; their names are the checkpoint's tensor names, so keep them stable."""
        raise NotImplementedError

    def dequantize_weight(self, layer, dtype: torch.dtype) -> torch.Tensor:
        """The (out, in) weight the matmul uses, from the tensors ``layer`` stores."""
        raise NotImplementedError

    def stored_bytes(self, out_features: int, in_features: int, group: int) -> int:
        """Bytes of the weight tensors quantize_weight() returns, without building them
        (mixed precision sizes every layer in every format)."""
        raise NotImplementedError

    def group_size(self, group: int) -> int:
        """Input channels per weight scale (1: per output channel); in_features must be a multiple."""
        return 1

    # -- running -------------------------------------------------------------------------
    def fast_path(self, device: torch.device) -> tuple[bool, str]:
        """Whether a native kernel runs on ``device``; if not and the format has one, why."""
        return False, ""

    def fake_quantize_activations(self, x: torch.Tensor) -> torch.Tensor:
        """The activations as this format's hardware would see them (weight-only: as they are)."""
        return x

    def matmul(self, layer, x2: torch.Tensor) -> torch.Tensor:
        """x2 (rows, in) -> (rows, out), without the low-rank branch, with the bias only
        when ``fuses_bias``. Default: dequantize the weight and run it in the layer's dtype."""
        if layer.monitor is not None:
            layer.report_finite(x2.abs().amax())
        inputs = self.fake_quantize_activations(layer.smoothed(x2))
        return F.linear(inputs, layer.dequantized_weight(x2.dtype))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class PerChannelFormat(Format):
    """Symmetric, one fp32 scale per output channel: ``weight`` (codes, (out, in)) and
    ``weight_scale`` ((1, out), the layout ``torch._scaled_mm`` takes as scale_b)."""

    bits = 8
    qmax: float

    def quantize(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """x / scale rounded to the format's codes (weights and, for W8A8, activations)."""
        raise NotImplementedError

    def quantize_weight(self, weight, group):
        scale = absmax_scale(weight, self.qmax)  # (out, 1)
        return {"weight": self.quantize(weight, scale), "weight_scale": scale.reshape(1, -1).contiguous()}

    def dequantize_weight(self, layer, dtype):
        return (layer.weight.float() * layer.weight_scale.reshape(-1, 1)).to(dtype)

    def stored_bytes(self, out_features, in_features, group):
        return out_features * in_features * self.bits // 8 + 4 * out_features  # codes + fp32 scale per channel


FORMATS: dict[str, Format] = {}  # name -> format, in registration order (the order users see them listed)


def register_format(fmt: Format) -> Format:
    """Make ``fmt`` a mode ``QuantLinear``, mixed precision and checkpoints know by name."""
    if not fmt.name or fmt.bits <= 0:
        raise ValueError(f"{type(fmt).__name__}: a format needs a name and bits > 0, got {fmt.name!r}, {fmt.bits}")
    if fmt.name in FORMATS:
        raise ValueError(f"a format named {fmt.name!r} is already registered ({FORMATS[fmt.name]})")
    FORMATS[fmt.name] = fmt
    return fmt


def unregister_format(name: str) -> None:
    FORMATS.pop(name, None)


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise ValueError(f"unknown quantization mode {name!r}; valid: {', '.join(FORMATS)}")
    return FORMATS[name]


# -- arithmetic the formats share -----------------------------------------------------
def absmax_scale(x: torch.Tensor, qmax: float, dim: int | None = -1) -> torch.Tensor:
    """fp32 scale ``max|x| / qmax`` over ``dim`` (kept), or over the whole tensor. A NaN or
    Inf in x makes the scale non-finite, which the layers' finiteness check reports."""
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    return amax.float().clamp_min(TINY) / qmax


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes in [0, 2**bits) along the last dim -> uint8, 8 // bits codes a byte."""
    per_byte = 8 // bits
    codes = codes.to(torch.uint8).reshape(*codes.shape[:-1], -1, per_byte)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.uint8) * bits
    return (codes << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.uint8) * bits
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)


def nbytes(tensors) -> int:
    values = tensors.values() if isinstance(tensors, dict) else tensors
    return sum(t.numel() * t.element_size() for t in values if t is not None)
