"""Number formats of the KV cache: how a chunk's keys and values are stored between chunks
and read back (dequantized) for every later attention call.

A format turns a (B, heads, frames, tokens, dim) tensor into a ``Stored`` (the payload and,
for the 8-bit ones, one scale per token and head) and back. All three are per-token: a token
of one frame, in one head, is one row of ``dim`` numbers with its own scale, so a cached frame
can be dropped (window eviction) without touching any other frame's numbers.

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

Scales are kept in float32: 4 bytes per row of ``dim`` numbers (3 % of an INT8 row at dim 128).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0


@dataclass
class Stored:
    """One cached tensor: ``data`` (B, H, frames, tokens, dim) in the format's dtype and, for the
    8-bit formats, ``scale`` (B, H, frames, tokens, 1) float32."""

    data: torch.Tensor
    scale: torch.Tensor | None = None

    def nbytes(self) -> int:
        return self.data.nbytes + (self.scale.nbytes if self.scale is not None else 0)

    def select_frames(self, index: torch.Tensor) -> Stored:
        """Keep the frames at ``index`` (a (frames,) int64 tensor), dropping the others."""
        pick = lambda x: None if x is None else x.index_select(2, index.to(x.device))
        return Stored(pick(self.data), pick(self.scale))

    def append(self, other: Stored) -> Stored:
        cat = lambda a, b: None if a is None else torch.cat([a, b], dim=2)
        return Stored(cat(self.data, other.data), cat(self.scale, other.scale))


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


def load(stored: Stored, dtype: torch.dtype) -> torch.Tensor:
    """The dequantized tensor in ``dtype`` (the model's)."""
    if stored.scale is None:
        return stored.data.to(dtype)
    return (stored.data.float() * stored.scale).to(dtype)


FORMATS = {"native": store_native, "bf16": store_bf16, "int8": store_int8, "fp8": store_fp8}

__all__ = ["FORMATS", "Stored", "load"]
