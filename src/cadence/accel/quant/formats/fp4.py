"""``nvfp4`` and ``mxfp4``: E2M1 values (+-{0, 0.5, 1, 1.5, 2, 3, 4, 6}) in blocks of 16
with an FP8 e4m3 block scale times one fp32 tensor scale (NVFP4), or blocks of 32 with a
power-of-two E8M0 block scale (MXFP4, OCP Microscaling).

Hopper has no FP4 tensor cores: the packed codes and block scales are stored (so the memory
is real: 4.5 and 4.25 bits a weight) and the matmul runs in the layer's dtype on
dequantized values, activations fake-quantized the same way per block of input channels.
What it measures is the accuracy FP4 hardware (Blackwell) would give.
"""

from __future__ import annotations

import torch

from cadence.accel.quant.formats._base import TINY, Format, pack, register_format, unpack
from cadence.accel.quant.formats.fp8 import FP8, FP8_MAX

E2M1_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def _e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value of x (already scaled into [-6, 6]) as a 4-bit code: sign << 3 | index."""
    midpoints = torch.tensor(_E2M1_MIDPOINTS, device=x.device, dtype=x.dtype)
    index = torch.bucketize(x.abs().clamp(max=E2M1_MAX), midpoints)
    return (index | ((x < 0).to(index.dtype) << 3)).to(torch.uint8)


def _e2m1_values(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    table = torch.tensor(E2M1_VALUES, device=codes.device, dtype=dtype)
    values = table[(codes & 7).long()]
    return torch.where(codes >= 8, -values, values)


class FP4Format(Format):
    """E2M1 codes, a scale per ``block`` of the last dim; a subclass says how the block
    scale is encoded (:meth:`encode_scales`) and decoded (:meth:`block_scale`)."""

    bits = 4
    block: int

    def encode_scales(self, amax: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Block maxima (..., blocks, 1) -> (the fp32 scale the codes are rounded against,
        the tensors stored for it)."""
        raise NotImplementedError

    def block_scale(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """(..., blocks) fp32 scales from the stored tensors."""
        raise NotImplementedError

    def quantize(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows of x (last dim a multiple of the block) -> packed E2M1 codes and block scales."""
        rows, cols = x.shape[:-1], x.shape[-1]
        blocks = x.float().reshape(*rows, cols // self.block, self.block)
        scale, stored = self.encode_scales(blocks.abs().amax(dim=-1, keepdim=True))
        codes = _e2m1_codes(blocks / scale.clamp_min(TINY))
        return {"codes": pack(codes.reshape(*rows, cols), 4), **stored}

    def dequantize(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        codes = unpack(tensors["codes"], 4)
        rows, cols = codes.shape[:-1], codes.shape[-1]
        values = _e2m1_values(codes, torch.float32).reshape(*rows, cols // self.block, self.block)
        return (values * self.block_scale(tensors).unsqueeze(-1)).reshape(*rows, cols).to(dtype)

    def fake_quantize_activations(self, x):
        return self.dequantize(self.quantize(x), x.dtype)

    def group_size(self, group):
        return self.block

    def quantize_weight(self, weight, group):
        return self.quantize(weight)

    def dequantize_weight(self, layer, dtype):
        tensors = {name: getattr(layer, name) for name in ("codes", "block_scale", "tensor_scale") if hasattr(layer, name)}
        return self.dequantize(tensors, dtype)

    def stored_bytes(self, out_features, in_features, group):
        weights = out_features * in_features
        return weights // 2 + weights // self.block  # two codes a byte + a one-byte scale a block


class NVFP4Format(FP4Format):
    """Block scale e4m3(amax_block / 6 / tensor_scale), tensor scale amax / (448 * 6): the
    block scales spend e4m3's whole range."""

    name = "nvfp4"
    block = 16

    def encode_scales(self, amax):
        tensor_scale = (amax.amax() / (FP8_MAX * E2M1_MAX)).clamp_min(TINY)
        block_scale = (amax / E2M1_MAX / tensor_scale).clamp(max=FP8_MAX).to(FP8)
        return block_scale.float() * tensor_scale, {"block_scale": block_scale.squeeze(-1),
                                                    "tensor_scale": tensor_scale.reshape(1)}

    def block_scale(self, tensors):
        return tensors["block_scale"].float() * tensors["tensor_scale"]

    def stored_bytes(self, out_features, in_features, group):
        return super().stored_bytes(out_features, in_features, group) + 4  # the fp32 tensor scale


class MXFP4Format(FP4Format):
    """Block scale 2**(floor(log2 amax_block) - 2), stored E8M0 as the biased exponent (2:
    log2 of E2M1's largest power of two)."""

    name = "mxfp4"
    block = 32

    def encode_scales(self, amax):
        exponent = torch.floor(torch.log2(amax.clamp_min(2.0 ** -126))) - 2
        exponent = exponent.clamp(-127, 127)
        return torch.exp2(exponent), {"block_scale": (exponent + 127).to(torch.uint8).squeeze(-1)}

    def block_scale(self, tensors):
        return torch.exp2(tensors["block_scale"].float() - 127)


NVFP4 = register_format(NVFP4Format())
MXFP4 = register_format(MXFP4Format())
