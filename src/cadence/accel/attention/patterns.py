"""Block masks: pure functions of the token layout and a pattern's parameters.

Attention is split into ``block x block`` tiles of query and key tokens; a pattern keeps
some key blocks per query block (a boolean ``block_mask``), the kernel skips the rest.
For the blocks to be compact in space and time, video tokens are first reordered from
raster order into 3D tiles of ``block`` tokens (Sliding Tile Attention, Zhang et al. 2025):
a block of 128 tokens is then a 2 x 8 x 8 (frames x height x width) brick, so "near"
means near in the video. Text tokens go after the video tokens and their blocks stay
dense both ways: every text token sees and is seen by every token.

Every pattern here keeps the same number of key blocks in each row, the diagonal among
them, so its density (kept / all video block pairs) is exactly what was asked for,
rounded up to a whole block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import torch

from cadence.models import TokenLayout

# Block sizes the kernels take: Triton's tl.dot and FlexAttention need multiples of 16.
BLOCK_SIZES = (16, 32, 64, 128, 256)
# Distance that puts one criterion strictly before another (lexicographic order).
_FAR = 1e6


def tile_shape(layout: TokenLayout, block: int) -> tuple[int, int, int]:
    """A (frames, height, width) brick of ``block`` tokens: 2 frames deep when the video
    has frames to spare (STA's 2 x 8 x 8 at 128 tokens on Wan), the rest as square as can
    be in height x width."""
    exponent = int(math.log2(block))
    depth = 2 if layout.frames > 1 and exponent >= 5 else 1
    rest = exponent - (depth == 2)
    height = 2 ** (rest // 2)
    return depth, height, block // (depth * height)


@dataclass(frozen=True)
class Geometry:
    """A layout cut into blocks: the token order the kernels see and each block's place."""

    layout: TokenLayout
    block: int
    _memo: dict = field(default_factory=dict, compare=False, repr=False)

    def memo(self, key, build):
        """A mask that depends only on this geometry (and ``key``), built once."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    @cached_property
    def order(self) -> torch.Tensor:
        """(tokens,) index into the model's sequence of each token in kernel order: video
        tokens tile by tile (raster order inside a tile), then the text tokens."""
        f, h, w = self.layout.frames, self.layout.height, self.layout.width
        tf, th, tw = tile_shape(self.layout, self.block)
        frame, row, column = torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij")
        # Sort key: tile index (frame tile, row tile, column tile), then position in it.
        tiles_h, tiles_w = -(-h // th), -(-w // tw)
        tile = ((frame // tf) * tiles_h + row // th) * tiles_w + column // tw
        inside = ((frame % tf) * th + row % th) * tw + column % tw
        video = torch.argsort((tile * self.block + inside).flatten(), stable=True)
        text = torch.arange(self.layout.text)
        if self.layout.text_first:
            return torch.cat([video + self.layout.text, text])
        return torch.cat([video, text + self.layout.video])

    @cached_property
    def inverse(self) -> torch.Tensor:
        return torch.argsort(self.order)

    @property
    def num_blocks(self) -> int:
        return -(-self.layout.tokens // self.block)

    @property
    def pattern_blocks(self) -> int:
        """Blocks that hold only video tokens, the ones a pattern chooses among; with text,
        the block where video ends and text begins is dense like the text blocks."""
        if self.layout.text == 0:
            return self.num_blocks
        return self.layout.video // self.block

    @cached_property
    def centers(self) -> torch.Tensor:
        """(pattern_blocks, 3): mean (frame, row, column) of each pattern block's tokens."""
        f, h, w = self.layout.frames, self.layout.height, self.layout.width
        position = torch.stack(
            torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij"), dim=-1
        ).reshape(-1, 3).float()
        video_order = self.order[: self.layout.video] - (self.layout.text if self.layout.text_first else 0)
        position = position[video_order]
        blocks = torch.arange(self.layout.video) // self.block
        sums = torch.zeros(self.num_blocks, 3).index_add_(0, blocks, position)
        counts = torch.bincount(blocks, minlength=self.num_blocks).clamp(min=1)
        return (sums / counts[:, None])[: self.pattern_blocks]

    def full_mask(self, pattern: torch.Tensor) -> torch.Tensor:
        """(..., num_blocks, num_blocks): a pattern over the video blocks, every block that
        holds a text token kept both ways."""
        n, p = self.num_blocks, self.pattern_blocks
        if n == p:
            return pattern
        mask = torch.ones(*pattern.shape[:-2], n, n, dtype=torch.bool, device=pattern.device)
        mask[..., :p, :p] = pattern
        return mask


def keep_count(density: float, blocks: int) -> int:
    """Key blocks kept per query block at a density: at least the diagonal."""
    return min(blocks, max(1, math.ceil(density * blocks - 1e-9)))


def nearest(distance: torch.Tensor, density: float) -> torch.Tensor:
    """Keep, in each row, the ``density`` share of key blocks nearest to the query block
    (ties: lower index first). (..., q, k) float -> (..., q, k) bool."""
    keep = keep_count(density, distance.shape[-1])
    order = torch.argsort(distance, dim=-1, stable=True)[..., :keep]
    return torch.zeros_like(distance, dtype=torch.bool).scatter_(-1, order, True)


def _offsets(centers: torch.Tensor) -> torch.Tensor:
    return (centers[:, None, :] - centers[None, :, :]).abs()  # (q, k, 3): |dframe|, |drow|, |dcolumn|


def window_distance(centers: torch.Tensor, time_scale: float = 1.0) -> torch.Tensor:
    """3D local window (STA, NATTEN): Chebyshev distance in tokens, a frame counting
    ``time_scale`` tokens. Its nearest blocks form a brick around the query block."""
    offset = _offsets(centers)
    return torch.maximum(offset[..., 0] * time_scale, offset[..., 1:].amax(-1))


def radial_distance(centers: torch.Tensor) -> torch.Tensor:
    """Radial Attention (Li et al. 2025): the spatial window halves each time the frame
    distance doubles, attention energy decaying with distance in space and time. Spatial
    Chebyshev distance scaled by 2^floor(log2(1 + |dframe|)), frame distance breaks ties."""
    offset = _offsets(centers)
    band = torch.exp2(torch.floor(torch.log2(1 + offset[..., 0])))
    return (1 + offset[..., 1:].amax(-1)) * band + offset[..., 0] / _FAR


def spatial_distance(centers: torch.Tensor) -> torch.Tensor:
    """A spatial head (Sparse VideoGen): its own and the nearest frames, all of each."""
    offset = _offsets(centers)
    return offset[..., 0] * _FAR + offset[..., 1:].amax(-1)


def temporal_distance(centers: torch.Tensor) -> torch.Tensor:
    """A temporal head (Sparse VideoGen): the same place in every frame, then neighbours."""
    offset = _offsets(centers)
    return offset[..., 1:].amax(-1) * _FAR + offset[..., 0]


def sink_local(blocks: int, density: float, sink: int = 1, causal: bool = False) -> torch.Tensor:
    """Attention sink + sliding window over the block sequence (StreamingLLM, Self-Forcing
    style): the first ``sink`` blocks and a band around the diagonal, as wide as the density
    allows; ``causal`` keeps only the band's past half. (blocks, blocks) bool."""
    index = torch.arange(blocks)
    offset = index[:, None] - index[None, :]  # query - key
    distance = offset.abs().float()
    if causal:
        distance = torch.where(offset >= 0, offset.float(), float("inf"))
    distance = torch.where(index[None, :] < sink, -1.0, distance)  # sinks first
    mask = nearest(distance, density)
    if causal:
        mask &= offset >= 0
    return mask


def pooled(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of each block of ``block`` tokens; the last may be short. (B, H, S, D) ->
    (B, H, blocks, D)."""
    tokens = x.shape[-2]
    blocks = -(-tokens // block)
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, blocks * block - tokens))
    counts = torch.full((blocks,), block, device=x.device)
    counts[-1] = tokens - (blocks - 1) * block
    return padded.unflatten(-2, (blocks, block)).sum(-2) / counts[:, None]


def top_blocks(
    query: torch.Tensor, key: torch.Tensor, block: int, density: float, mass: float = 0.0, scale: float | None = None
) -> torch.Tensor:
    """Dynamic block selection from pooled scores (SpargeAttn, XAttention): mean-pool Q and
    K per block, softmax the block-level scores per query block, keep key blocks in order
    of estimated attention mass until ``mass`` of it is covered (if ``mass`` > 0) or the
    density budget is spent, whichever comes first; the diagonal is always kept.
    query, key: (B, H, S, D) of the pattern blocks' tokens -> (B, H, blocks, blocks) bool."""
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    scores = pooled(query, block) @ pooled(key, block).transpose(-1, -2) * scale  # (B, H, q, k)
    blocks = scores.shape[-1]
    diagonal = torch.eye(blocks, dtype=torch.bool, device=scores.device)
    probability = torch.softmax(scores, dim=-1)
    # The diagonal sorts first (probabilities are <= 1).
    _, order = torch.sort(probability.masked_fill(diagonal, 2.0), dim=-1, descending=True, stable=True)
    keep = torch.arange(blocks, device=scores.device) < keep_count(density, blocks)
    if mass > 0:
        ranked = probability.gather(-1, order)
        covered = ranked.cumsum(-1) - ranked  # mass of the blocks kept before this one
        keep = keep & (covered < mass)
    return torch.zeros_like(order, dtype=torch.bool).scatter_(-1, order, keep.expand_as(order))


def captured_mass(
    query: torch.Tensor, key: torch.Tensor, candidates: torch.Tensor, block: int, samples: int, scale: float | None = None
) -> torch.Tensor:
    """How much of the true attention each candidate mask keeps, per head (Sparse VideoGen's
    online profiling): exact attention rows for ``samples`` query tokens spread evenly over
    the sequence, summed over the key blocks each candidate keeps for them.
    query, key: (B, H, S, D); candidates: (C, B or 1, H or 1, blocks, blocks) bool -> (C, B, H)."""
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    tokens = query.shape[-2]
    rows = torch.linspace(0, tokens - 1, min(samples, tokens), device=query.device).long()
    attention = torch.softmax(query[..., rows, :].float() @ key.float().transpose(-1, -2) * scale, dim=-1)
    blocks = candidates.shape[-1]
    padded = torch.nn.functional.pad(attention, (0, blocks * block - tokens))
    per_block = padded.unflatten(-1, (blocks, block)).sum(-1)  # (B, H, samples, blocks)
    kept = candidates[..., rows // block, :].float()  # (C, B or 1, H or 1, samples, blocks)
    return (per_block[None] * kept).sum(-1).mean(-1)
