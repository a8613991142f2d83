"""KV-relative RoPE for Wan: the rotary embedding of tokens at any frame positions, built
from the model's own ``WanRotaryPosEmbed`` tables, and its application in the
(B, heads, tokens, dim) layout that ``scaled_dot_product_attention`` receives.

Wan splits each head's ``dim`` into a frame, a height and a width part and rotates each by
its own position (``WanRotaryPosEmbed.forward`` gives positions 0..frames-1 to a call's
frames). A stream re-indexes: the frames the cache keeps take positions 0..kept-1 in the order
they were generated, the current chunk the next ``frames_per_chunk`` positions, so no position
ever exceeds ``kept + frames_per_chunk`` however long the stream runs. The rotation is the one
``WanAttnProcessor`` applies (interleaved pairs, float32 tables, result cast back), elementwise
the same operations, so a chunk alone at positions 0..F-1 is rotated bit for bit as the model
rotates it.
"""

from __future__ import annotations

import torch


def rotary_tables(rope: torch.nn.Module, positions: torch.Tensor, height: int, width: int):
    """(cos, sin), each (1, 1, len(positions) * height * width, dim) float32: the tables for
    frames at ``positions`` (a (frames,) int64 tensor) of ``height`` x ``width`` patches,
    tokens frame-major as Wan's patch embedding lays them out."""
    split = [rope.t_dim, rope.h_dim, rope.w_dim]
    frames = positions.shape[0]
    tables = []
    for full in (rope.freqs_cos, rope.freqs_sin):
        by_frame, by_row, by_column = full.split(split, dim=1)
        parts = (
            by_frame[positions.to(full.device)].view(frames, 1, 1, -1).expand(frames, height, width, -1),
            by_row[:height].view(1, height, 1, -1).expand(frames, height, width, -1),
            by_column[:width].view(1, 1, width, -1).expand(frames, height, width, -1),
        )
        tables.append(torch.cat(parts, dim=-1).reshape(1, 1, frames * height * width, -1))
    return tables[0], tables[1]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, tokens, dim); the rotation of ``WanAttnProcessor``'s apply_rotary_emb."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)
