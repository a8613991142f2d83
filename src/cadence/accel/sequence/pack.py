"""``kv-pack``: a sink, a compressed mid context and a recent window (PackForcing's three-partition
KV cache, Mao et al. 2026; Deep Forcing's deep sink is the same cache with a long ``sink``).

The cache keeps three parts, in generation order:

- the first ``sink`` frames, whole, for the whole stream (the attention sink, as ``kv-sink-window``);
- the last ``mid`` frames evicted from the recent window, each average-pooled over ``ratio`` x
  ``ratio`` patches (``ratio**2`` times fewer tokens; a patch cut by the frame's edge averages the
  tokens it has), the oldest dropped when a new one arrives;
- the last ``frames`` frames, whole (the recent window).

So the cache holds at most ``(sink + frames) * tokens + mid * pooled_tokens`` tokens a layer,
however long the stream: its bytes are flat once the mid context is full.

Positions (keys are cached before RoPE, :mod:`cadence.accel.sequence.rope`): every kept frame,
pooled or whole, takes the next temporal position in generation order (sink 0..sink-1, the mid
frames next, the window after), so positions never run out. A pooled token sits spatially at its
patch's centre: rows ``r*ratio .. r*ratio+ratio-1`` pool to row ``r*ratio + (ratio-1)/2``, a half
position for an even ratio, rotated exactly at that half position (``rope.rotary_tables_at``);
the mean of the patch's angles is that same angle, so a patch of equal keys keeps the phase its
tokens had on average.

Where this differs from PackForcing: its mid context is compressed by a trained dual-branch
network (progressive 3D convolutions with a low-resolution VAE re-encoding, about 32x fewer
tokens) and routed by a top-k selection on query-key affinity; here the compression is
training-free spatial average pooling of the cached keys and values (one of the two mechanisms
the issue names; the top-k selection is not implemented), and the mid context is bounded by
first-in first-out, so any model streams with it and nothing is learned. PackForcing's
"incremental temporal RoPE adjustment" closes the position gaps its selection leaves; the
re-indexing of every kept frame to consecutive positions does the same here. Pooling K and V
separately is not attention to the pooled tokens' mean (softmax is not linear); quality is not
claimed, only the bound and the identity: with ``ratio=1`` nothing is pooled away and the cache
is ``kv-sink-window(sink, frames + mid)`` bit for bit (``kv-window(frames + mid)`` for ``sink=0``):
the same frames at the same positions, read in the same order. Pooled frames are read back from
the cache's format, pooled and stored again in it: with ``int4`` a pooled frame is quantized twice.
A prompt switch's KV re-cache (``cadence.stream``) re-encodes the whole frames only; the pooled
ones, encoded under the old prompt, are dropped and the mid context refills from the window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cadence.accel.registry import param
from cadence.accel.sequence._base import KVPolicyConfig


@dataclass(frozen=True)
class PackConfig(KVPolicyConfig):
    name = "kv-pack"
    summary = ("KV cache of sink frames, a mid context pooled ratio x ratio and a recent window, bytes flat "
               "(PackForcing's three partitions, pooled instead of learned)")

    sink: int = param(3, "first latent frames kept whole for the whole stream (PackForcing / LongLive: 3)", low=0)
    frames: int = param(12, "latent frames of the recent window, kept whole", low=1)
    mid: int = param(12, "frames evicted from the window kept pooled between sink and window, the most recent ones",
                     low=1, why="mid=0 is kv-sink-window")
    ratio: int = param(4, "side of the square of patches pooled into one token (ratio**2 fewer tokens a mid frame)",
                       low=1)

    def validate(self) -> None:
        for knob in ("sink", "frames", "mid", "ratio"):
            value = getattr(self, knob)
            self.require(isinstance(value, int) and not isinstance(value, bool),
                         f"{knob}={value!r}; valid: a whole number of {'patches' if knob == 'ratio' else 'frames'}")

    def keep(self, frames: list[int]) -> list[int]:
        sink = frames[:self.sink]
        recent = [frame for frame in frames[-self.frames:] if frame not in sink]
        return sink + recent

    def keep_pooled(self, frames: list[int]) -> list[int]:
        return list(frames[-self.mid:])

    def pool(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return pool_frames(x, height, width, self.ratio)

    def pooled_grid(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        return pooled_grid(height, width, self.ratio)

    @property
    def max_frames(self) -> int:
        return self.sink + self.frames + self.mid

    def check_chunk(self, frames_per_chunk: int) -> None:
        self.require(self.frames >= frames_per_chunk,
                     f"frames={self.frames} is shorter than one chunk (frames_per_chunk={frames_per_chunk}): the next "
                     f"chunk would not see all of the last one; valid: frames >= {frames_per_chunk}")


def pool_frames(x: torch.Tensor, height: int, width: int, ratio: int) -> torch.Tensor:
    """x: (B, H, frames, height * width, dim), tokens row-major; the mean of each ``ratio`` x
    ``ratio`` patch (of the tokens it has at the frame's edge), (B, H, frames, pooled tokens, dim)
    in x's dtype, averaged in float32."""
    batch, heads, frames, _, dim = x.shape
    grid = x.float().reshape(-1, height, width, dim).permute(0, 3, 1, 2)  # (B * H * frames, dim, height, width)
    pooled = F.avg_pool2d(grid, ratio, ratio, ceil_mode=True)  # (..., dim, rows, columns)
    return pooled.permute(0, 2, 3, 1).reshape(batch, heads, frames, -1, dim).to(x.dtype)


def pooled_grid(height: int, width: int, ratio: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns), each (pooled tokens,) float: the centre of every pooled patch, row-major,
    in patches; multiples of 1/2."""

    def centres(side: int) -> torch.Tensor:
        starts = torch.arange(math.ceil(side / ratio)) * ratio
        ends = (starts + ratio).clamp(max=side)
        return (starts + ends - 1) / 2

    rows, columns = centres(height), centres(width)
    return rows.repeat_interleave(len(columns)), columns.repeat(len(rows))


__all__ = ["PackConfig", "pool_frames", "pooled_grid"]
