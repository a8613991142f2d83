"""Number formats of the KV cache: how a chunk's keys and values are stored between chunks
and read back (dequantized) for every later attention call.

A format turns a (B, heads, frames, tokens, dim) tensor into a ``Stored`` (the payload and,
for the quantized ones, its scales) and back. Every format is per token or finer: a token of
one frame, in one head, is one row of ``dim`` numbers with its own scale (or, for ``int4``, a
scale and offset per group of the row), so a cached frame can be dropped (window eviction)
without touching any other frame's numbers.

- ``native``: the values as the model computed them (its own dtype): lossless, so a cached chunk
  is exactly what a block-causal forward would attend to.
- ``bf16``: the values cast to bfloat16 (2 bytes a number), no scale. On a bf16 model it is
  lossless; on a float32 model it rounds to bf16 (relative error <= 2**-8, 8 significant bits).
- ``int8``: symmetric absmax INT8 per token and head, ``scale = amax(|row|) / 127``: the
  dynamic per-token INT8 KV cache of LLM serving stacks (vLLM on Ascend's ``int8_pertoken``).
  KIVI (Liu et al. 2024) quantizes keys per channel instead; that ties a frame's scale to the
  other frames of its channel group, and so to the eviction order, while per token keeps each
  frame independent (and our keys are stored before RoPE, where the per-channel outliers KIVI
  answers are milder). Round trip: ``|x - x_hat| <= scale / 2`` elementwise.
- ``fp8``: e4m3 (``torch.float8_e4m3fn``) after dividing each row by ``amax / 448`` (the
  format's largest finite value). vLLM's FP8 KV cache uses one static scale per tensor or per
  head; a dynamic per-token scale costs 4 bytes a row and needs no calibration. Round trip:
  ``|x - x_hat| <= max(2**-4 |x|, 2**-10 scale)`` elementwise: half a unit in the last place of
  three mantissa bits, or half the subnormal spacing ``2**-9`` (in units of the scale).
- ``int4`` and ``int4-g64``: asymmetric INT4 per group of 32 (or 64) consecutive numbers of the
  head dim, two codes packed in a byte: ``step = (max - min) / 15``, ``code = round((x - min) / step)``
  in 0..15, read back as ``min + code * step``. Round trip: ``|x - x_hat| <= step / 2`` of its
  group. KIVI (Liu et al. 2024) and llama.cpp's Q4_1 store INT4 the same asymmetric way (KIVI
  groups keys per channel; per token keeps each frame independent, as for ``int8``).
  Asymmetric, not symmetric absmax: 16 levels over [min, max] give a step of at most
  ``amax / 7.5``, never more than symmetric's ``amax / 7`` (which leaves code -8 unused) and down
  to half of it on a group of one sign; the price is a second float per group. Where this differs
  from KIVI: no full-precision residual of the latest tokens (KIVI keeps its last tokens
  unquantized; here only the current chunk, attended from its own K/V, is), and scale and offset
  are float32, not fp16: a float32 offset keeps the
  half-step bound exact on groups with a large common offset, which an fp16 offset would round
  by more than a step. A head dim below the group is one group a row (the tiny test models have
  dim 12); one above it must be a multiple of it (Wan's 128 is). The group is in the format's
  name rather than a knob of ``kv-format``: a knob would be spelled out beside every other
  format, where it means nothing.

Scales are kept in float32: 4 bytes per row of ``dim`` numbers (3 % of an INT8 row at dim 128);
``int4`` keeps 8 per group: ``dim / 2 + 8 * dim / group`` bytes a row (96 at dim 128 and group 32,
80 for ``int4-g64``; bf16 takes 256).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import partial

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0
INT4_LEVELS = 15  # codes 0..15
INT4_GROUPS = {"int4": 32, "int4-g64": 64}  # format -> numbers of the head dim sharing a scale and offset


@dataclass
class Stored:
    """One cached tensor: ``data`` (B, H, frames, tokens, dim) in the format's dtype and, for the
    8-bit formats, ``scale`` (B, H, frames, tokens, 1) float32. Every field is a tensor (or None)
    whose dim 2 is the frame, so frames are picked and appended field by field."""

    data: torch.Tensor
    scale: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor | None]:
        return [getattr(self, f.name) for f in fields(self)]

    def nbytes(self) -> int:
        return sum(x.nbytes for x in self.tensors() if x is not None)

    def select_frames(self, index: torch.Tensor) -> Stored:
        """Keep the frames at ``index`` (a (frames,) int64 tensor), dropping the others."""
        pick = lambda x: None if x is None else x.index_select(2, index.to(x.device))
        return type(self)(*map(pick, self.tensors()))

    def gather_frames(self, index: torch.Tensor) -> Stored:
        """The frames at ``index`` ((B, H, n) int64) of each batch row and head: fields (B, H, n, ...),
        the other frames left unread (``kv-sparse``'s choice per head)."""

        def pick(x):
            if x is None:
                return None
            rows = index.to(x.device).view(*index.shape, *(1,) * (x.dim() - 3))
            return x.gather(2, rows.expand(*index.shape, *x.shape[3:]))

        return type(self)(*map(pick, self.tensors()))

    def append(self, other: Stored) -> Stored:
        cat = lambda a, b: None if a is None else torch.cat([a, b], dim=2)
        return type(self)(*map(cat, self.tensors(), other.tensors()))

    def load(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized tensor (B, H, frames, tokens, dim) in ``dtype`` (the model's)."""
        if self.scale is None:
            return self.data.to(dtype)
        return (self.data.float() * self.scale).to(dtype)


@dataclass
class PackedInt4(Stored):
    """``data`` (B, H, frames, tokens, dim / 2) uint8, the even number of each pair in the low
    nibble; ``scale`` (the step) and ``offset`` (the group's min), each (B, H, frames, tokens,
    groups, 1) float32."""

    offset: torch.Tensor | None = None

    def load(self, dtype: torch.dtype) -> torch.Tensor:
        codes = torch.stack([self.data & 0xF, self.data >> 4], dim=-1).flatten(-2)  # (..., dim)
        groups = self.scale.shape[-2]
        rows = codes.unflatten(-1, (groups, -1)).float() * self.scale + self.offset  # (..., groups, group)
        return rows.flatten(-2).to(dtype)


def _row_amax(x: torch.Tensor) -> torch.Tensor:
    # A row of zeros gets scale 1 (any scale reproduces it); avoids 0/0.
    amax = x.float().abs().amax(dim=-1, keepdim=True)
    return torch.where(amax > 0, amax, torch.ones_like(amax))


def store_native(x: torch.Tensor) -> Stored:
    return Stored(x.contiguous())


def store_bf16(x: torch.Tensor) -> Stored:
    return Stored(x.to(torch.bfloat16))


def store_int8(x: torch.Tensor) -> Stored:
    scale = _row_amax(x) / INT8_MAX
    return Stored(torch.round(x.float() / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale)


def store_fp8(x: torch.Tensor) -> Stored:
    scale = _row_amax(x) / FP8_MAX
    return Stored((x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale)


def int4_group(dim: int, group: int) -> int:
    """The numbers of a row sharing a scale: ``group``, or the whole row when it is shorter."""
    size = min(group, dim)
    if dim % size or size % 2:
        groups = ", ".join(f"{name}: {size}" for name, size in INT4_GROUPS.items())
        raise ValueError(f"int4 KV: head dim {dim} does not split into groups of {group} (two codes a byte); valid: "
                         f"a head dim that is a multiple of the group ({groups}), or an even one shorter than it (one "
                         "group a row)")
    return size


def store_int4(x: torch.Tensor, group: int = INT4_GROUPS["int4"]) -> PackedInt4:
    size = int4_group(x.shape[-1], group)
    rows = x.float().unflatten(-1, (-1, size))  # (..., groups, group)
    low, high = rows.amin(-1, keepdim=True), rows.amax(-1, keepdim=True)
    step = (high - low) / INT4_LEVELS
    # A constant group gets step 1 (code 0 reproduces it exactly); avoids 0/0.
    step = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.round((rows - low) / step).clamp_(0, INT4_LEVELS).to(torch.uint8).flatten(-2)  # (..., dim)
    return PackedInt4(codes[..., 0::2] | (codes[..., 1::2] << 4), step, low)


def load(stored: Stored, dtype: torch.dtype) -> torch.Tensor:
    """The dequantized tensor in ``dtype`` (the model's)."""
    return stored.load(dtype)


FORMATS = {"native": store_native, "bf16": store_bf16, "int8": store_int8, "fp8": store_fp8,
           **{name: partial(store_int4, group=group) for name, group in INT4_GROUPS.items()}}

__all__ = ["FORMATS", "INT4_GROUPS", "PackedInt4", "Stored", "int4_group", "load"]
