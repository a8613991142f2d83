"""Number formats: quantize and dequantize tensors, pure functions of the tensor and the
format's parameters (no modules, no state).

- FP8 e4m3 and INT8, symmetric, with one scale per row (per output channel for weights,
  per token for activations) or one per tensor.
- INT2/INT4/INT8 weight-only, asymmetric per group of ``group`` input channels (a scale and
  an offset in fp16 per group), codes packed several to a byte.
- NVFP4 and MXFP4: E2M1 values (+-{0, 0.5, 1, 1.5, 2, 3, 4, 6}) in blocks of 16 with an FP8
  e4m3 block scale times one fp32 tensor scale (NVFP4), or blocks of 32 with a power-of-two
  E8M0 block scale (MXFP4, OCP Microscaling). Hopper has no FP4 tensor cores: cadence stores
  the packed codes (so the memory is real) and computes in the layer's dtype.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0
E2M1_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
FP4_GROUP = {"nvfp4": 16, "mxfp4": 32}
TINY = 1e-12  # floor of a scale, so an all-zero row quantizes to zeros, not NaN


def absmax_scale(x: torch.Tensor, qmax: float, dim: int | None = -1) -> torch.Tensor:
    """fp32 scale ``max|x| / qmax`` over ``dim`` (kept), or over the whole tensor. A NaN or
    Inf in x makes the scale non-finite, which the layers' finiteness check reports."""
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    return amax.float().clamp_min(TINY) / qmax


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


# -- packing --------------------------------------------------------------------------
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


# -- weight-only integers, asymmetric per group ---------------------------------------
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


# -- FP4 (E2M1) ------------------------------------------------------------------------
def _e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value of x (already scaled into [-6, 6]) as a 4-bit code: sign << 3 | index."""
    midpoints = torch.tensor(_E2M1_MIDPOINTS, device=x.device, dtype=x.dtype)
    index = torch.bucketize(x.abs().clamp(max=E2M1_MAX), midpoints)
    return (index | ((x < 0).to(index.dtype) << 3)).to(torch.uint8)


def _e2m1_values(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    table = torch.tensor(E2M1_VALUES, device=codes.device, dtype=dtype)
    values = table[(codes & 7).long()]
    return torch.where(codes >= 8, -values, values)


def quantize_fp4(x: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    """Rows of x (last dim a multiple of the block) -> packed E2M1 codes and block scales.

    NVFP4: block scale = e4m3(amax_block / 6 / tensor_scale), tensor scale = amax / (448 * 6),
    so the block scale spends e4m3's whole range. MXFP4: block scale = 2**(floor(log2
    amax_block) - 2), E8M0 stored as the biased exponent (2 = log2 of E2M1's largest power)."""
    group = FP4_GROUP[kind]
    rows, cols = x.shape[:-1], x.shape[-1]
    blocks = x.float().reshape(*rows, cols // group, group)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    if kind == "nvfp4":
        tensor_scale = (amax.amax() / (FP8_MAX * E2M1_MAX)).clamp_min(TINY)
        block_scale = (amax / E2M1_MAX / tensor_scale).clamp(max=FP8_MAX).to(FP8)
        scale = block_scale.float() * tensor_scale
        stored = {"block_scale": block_scale.squeeze(-1), "tensor_scale": tensor_scale.reshape(1)}
    else:
        exponent = torch.floor(torch.log2(amax.clamp_min(2.0 ** -126))) - 2
        exponent = exponent.clamp(-127, 127)
        scale = torch.exp2(exponent)
        stored = {"block_scale": (exponent + 127).to(torch.uint8).squeeze(-1)}
    codes = _e2m1_codes(blocks / scale.clamp_min(TINY))
    return {"codes": pack(codes.reshape(*rows, cols), 4), **stored}


def fp4_block_scale(tensors: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    if kind == "nvfp4":
        return tensors["block_scale"].float() * tensors["tensor_scale"]
    return torch.exp2(tensors["block_scale"].float() - 127)


def dequantize_fp4(tensors: dict[str, torch.Tensor], kind: str, dtype: torch.dtype) -> torch.Tensor:
    codes = unpack(tensors["codes"], 4)
    rows, cols = codes.shape[:-1], codes.shape[-1]
    group = FP4_GROUP[kind]
    values = _e2m1_values(codes, torch.float32).reshape(*rows, cols // group, group)
    return (values * fp4_block_scale(tensors, kind).unsqueeze(-1)).reshape(*rows, cols).to(dtype)


def fake_fp4(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Quantize-dequantize (activations on a GPU without FP4 units)."""
    return dequantize_fp4(quantize_fp4(x, kind), kind, x.dtype)


def nbytes(tensors) -> int:
    values = tensors.values() if isinstance(tensors, dict) else tensors
    return sum(t.numel() * t.element_size() for t in values if t is not None)
