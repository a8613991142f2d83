"""Weight-only integers, for memory: the weight is stored in 8, 4 or 2 bits and
dequantized to the layer's dtype for the matmul (activations are not touched).

``weight-int8`` is symmetric per output channel; ``weight-int4`` and ``weight-int2`` are
asymmetric (a scale and an offset in fp16) per group of ``group`` input channels, codes
packed several to a byte: 4.25 bits a weight for INT4 at group 128.
"""

from __future__ import annotations

import torch

from cadence.accel.quant.formats._base import TINY, Format, PerChannelFormat, pack, register_format, unpack
from cadence.accel.quant.formats.int8 import INT8_MAX, quantize_int8


def quantize_groupwise(w: torch.Tensor, bits: int, group: int) -> dict[str, torch.Tensor]:
    """(out, in) weight -> packed codes and per-group fp16 scale and offset:
    ``w ~ codes * scale + offset`` with codes in [0, 2**bits - 1] (min-max, per group)."""
    out_features, in_features = w.shape
    groups = w.float().reshape(out_features, in_features // group, group)
    low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
    levels = (1 << bits) - 1
    scale = ((high - low) / levels).clamp_min(TINY)
    # fp16 scale and offset are what is stored: quantize against the stored values.
    scale, offset = scale.half(), low.half()
    codes = ((groups - offset.float()) / scale.float()).round().clamp(0, levels)
    return {"codes": pack(codes.reshape(out_features, in_features), bits),
            "scale": scale.squeeze(-1), "offset": offset.squeeze(-1)}


def dequantize_groupwise(tensors: dict[str, torch.Tensor], bits: int, dtype: torch.dtype) -> torch.Tensor:
    codes = unpack(tensors["codes"], bits)  # (out, in)
    out_features, in_features = codes.shape
    groups = tensors["scale"].shape[-1]
    codes = codes.reshape(out_features, groups, in_features // groups).to(dtype)
    w = codes * tensors["scale"].to(dtype).unsqueeze(-1) + tensors["offset"].to(dtype).unsqueeze(-1)
    return w.reshape(out_features, in_features)


class WeightInt8Format(PerChannelFormat):
    name = "weight-int8"
    qmax = INT8_MAX

    def quantize(self, x, scale):
        return quantize_int8(x, scale)


class GroupwiseFormat(Format):
    """Asymmetric ``bits``-bit codes per group of input channels (min-max per group)."""

    def __init__(self, bits: int):
        self.name, self.bits = f"weight-int{bits}", bits

    def group_size(self, group):
        return group

    def quantize_weight(self, weight, group):
        return quantize_groupwise(weight, self.bits, group)

    def dequantize_weight(self, layer, dtype):
        return dequantize_groupwise(dict(codes=layer.codes, scale=layer.scale, offset=layer.offset), self.bits, dtype)

    def stored_bytes(self, out_features, in_features, group):
        weights = out_features * in_features
        return weights * self.bits // 8 + 4 * (weights // group)  # codes + fp16 scale and offset per group


register_format(WeightInt8Format())
register_format(GroupwiseFormat(4))
register_format(GroupwiseFormat(2))
