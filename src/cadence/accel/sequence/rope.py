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

Pooled tokens (``kv-pack``) sit at the centres of the patches they average, half positions for
an even pooling ratio: ``rotary_tables_at`` turns the table's row below by half a position's
angle, exactly (angle addition), and gives whole positions the table's own rows bit for bit.
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


def _half_step(cos_table: torch.Tensor, sin_table: torch.Tensor, coordinates: torch.Tensor):
    """(cos, sin), each (len(coordinates), columns): the table's rows at ``coordinates``, multiples
    of 1/2. A whole coordinate is the table's own row, bit for bit; a half one is the row below
    turned by half of each column's frequency w: cos((p + 1/2) w) = cos(pw) cos(w/2) - sin(pw)
    sin(w/2), with cos(w/2) = sqrt((1 + cos w) / 2) and sin(w/2) = sin w / (2 cos(w/2)) read off
    row 1 (Wan's frequencies are at most 1 radian a position, so w/2 is in the first quadrant)."""
    whole = coordinates.floor()
    cos, sin = cos_table[whole.long()], sin_table[whole.long()]
    cos_half = ((1 + cos_table[1]) / 2).sqrt()
    sin_half = sin_table[1] / (2 * cos_half)
    half = (coordinates != whole).unsqueeze(-1)
    return (torch.where(half, cos * cos_half - sin * sin_half, cos),
            torch.where(half, sin * cos_half + cos * sin_half, sin))


def rotary_tables_at(rope: torch.nn.Module, positions: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor):
    """(cos, sin), each (1, 1, len(positions) * len(rows), dim) float32: the tables for frames at
    ``positions`` (a (frames,) int64 tensor) whose tokens sit at (``rows[i]``, ``columns[i]``),
    float coordinates in patches, multiples of 1/2 (the centres of pooled patches). On the whole
    grid (rows and columns of every patch, row-major) they are ``rotary_tables`` bit for bit."""
    split = [rope.t_dim, rope.h_dim, rope.w_dim]
    frames, tokens = positions.shape[0], rows.shape[0]
    (cos_frame, cos_row, cos_column), (sin_frame, sin_row, sin_column) = (
        full.split(split, dim=1) for full in (rope.freqs_cos, rope.freqs_sin))
    by_row = _half_step(cos_row, sin_row, rows.to(cos_row.device))
    by_column = _half_step(cos_column, sin_column, columns.to(cos_column.device))
    tables = []
    for by_frame, row, column in zip((cos_frame, sin_frame), by_row, by_column):
        parts = (
            by_frame[positions.to(by_frame.device)].view(frames, 1, -1).expand(frames, tokens, -1),
            row.view(1, tokens, -1).expand(frames, tokens, -1),
            column.view(1, tokens, -1).expand(frames, tokens, -1),
        )
        tables.append(torch.cat(parts, dim=-1).reshape(1, 1, frames * tokens, -1))
    return tables[0], tables[1]
