"""``kv-sparse``: chunk-aware sparse attention over the streaming KV cache (the frame level of Light
Forcing's Hierarchical Sparse Attention, Lv et al. 2026, arXiv 2602.04789).

A policy (:mod:`cadence.accel.sequence.policies`, :mod:`.pack`) decides which frames the cache
keeps; this term decides which of them each attention call reads. For every call of the current
chunk (each denoising step and the write pass, each layer), every batch row and every head:

- the oldest ``sink`` cached whole frames and the newest ``recent`` are always read;
- of the frames between them, the ``frames`` with the highest score are read, the others are not;
- the chunk always attends to itself, and a ``kv-pack`` cache's pooled frames (already
  ``ratio**2`` times smaller) are always read;

then the chunk attends densely to [chosen frames, pooled frames, chunk]. A chunk reads at most
``sink + recent + frames`` whole frames however many the policy keeps. ``sink`` counts the oldest
frames the cache holds, whatever the policy: beside ``kv-sink-window(sink=3, ...)``, ``sink=3``
reads its sink; beside ``kv-window`` it is the window's oldest frames.

The score of a cached frame f is ``mean_i(q_i) . mean_j(k_j)``, i over the chunk's query tokens, j
over f's key tokens, both rotated as the attention sees them (RoPE at the current re-indexed
positions). By bilinearity it is the mean pre-softmax logit between the chunk and f, exactly: the
score is what the attention would put on f on average, and it carries the relative temporal
distance that RoPE gives the logits (a score before RoPE would rank a frame as if it sat at the
chunk's own position). The key means are kept per frame in the cache (``summaries``: ``dim`` float32
numbers per frame, head and layer, beside the ``tokens x dim`` of the frame's keys), computed when the
frame is written, with its tokens rotated spatially but not in time; a read turns them by the
frame's current temporal position (the temporal and spatial parts of Wan's RoPE rotate disjoint
numbers of the head dim, and one frame's tokens share their temporal angle, so turning the mean is
the mean of the turned keys). So scoring reads no cached key: a frame not chosen is never read
(the keys and values of the chosen frames are gathered from the store, then dequantized).

Bounds (tests/stream/test_kv_sparse.py): when ``sink + recent + frames`` covers every cached
whole frame the term reads the whole cache through the dense path, bit for bit; a chosen subset
equals dense attention over [cache, chunk] with the frames not chosen masked out, to float
rounding (the gathered keys are rotated bit for bit as the dense cache rotates them; the softmax
sums fewer terms, and with pooled frames in a different order: [chosen, pooled] where the dense
cache reads [older whole, pooled, newer whole]).

Where this differs from Light Forcing, and why:

- one query block per chunk: the query mean is over the whole chunk, not per block of 64 / 128
  query tokens, so that every head makes one dense attention call over gathered whole frames
  (per-block choices give each query block its own key set, which needs a block-sparse kernel);
- the frame level only: no second, block-level top-k inside the chosen frames;
- no Chunk-Aware Growth: every chunk reads the same number of frames (Light Forcing lowers
  the sparsity of early chunks by their noise level; here the first chunk has no cache, and the
  budget is one number a user can read);
- the key means are kept from write time (Light Forcing pools the keys on every call: the same
  value up to rounding, without reading the frames); they are taken from the keys as computed,
  before ``kv-format`` rounds them;
- while the cache holds no more than ``sink + recent + frames`` frames it is read whole (Light
  Forcing then still chooses key blocks, its block level);
- knobs: Light Forcing's ``keep_frames`` counts sink, recent and chosen together; here ``frames``
  counts the chosen ones only (its released config keeps 6: 1 sink, 2 recent, 3 chosen, the
  defaults here).

Quality is not claimed: Light Forcing measures trained causal students (Self-Forcing, LongLive);
here no trained stream student exists yet, and a bidirectional model streamed causally drifts.
The fidelity against the dense cache on ref-video is measured by benchmarks/stream_sparse.py
(figures in benchmarks/RESULTS.md). The share of cached frames read is the handle's ``stats()``
(``kv_sparse_read_share``; the mean keys are counted in ``kv_bytes``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cadence.accel.registry import Handle, TechniqueConfig, param
from cadence.accel.sequence._base import apply_sparse
from cadence.accel.sequence.rope import rotate


@dataclass(frozen=True)
class SparseConfig(TechniqueConfig):
    name = "kv-sparse"
    level = "sequence"
    summary = (
        "chunk-aware sparse attention over the KV cache: per chunk and head, the sink and recent cached frames "
        "and the `frames` others of highest mean logit (Light Forcing's frame level)"
    )

    frames: int = param(
        3,
        "cached frames read besides the sink and recent ones: those of highest mean logit with the "
        "chunk, chosen per chunk, layer and head (Light Forcing: 3)",
        low=0,
    )
    sink: int = param(1, "oldest cached whole frames, always read (Light Forcing: 1)", low=0)
    recent: int = param(2, "newest cached whole frames, always read (Light Forcing: 2)", low=0)

    def validate(self) -> None:
        for knob in ("frames", "sink", "recent"):
            value = getattr(self, knob)
            self.require(
                isinstance(value, int) and not isinstance(value, bool),
                f"{knob}={value!r}; valid: a whole number of frames",
            )
        self.require(
            self.frames + self.sink + self.recent > 0,
            "frames=0, sink=0, recent=0 reads no cached frame (the chunk alone, no stream); valid: "
            "frames + sink + recent >= 1",
        )

    def choose(self, scores: torch.Tensor) -> torch.Tensor | None:
        """scores: (B, H, cached whole frames), oldest first. The frames each (B, H) reads, (B, H,
        sink + recent + frames) int64 ascending; None when that is every frame (read the cache whole)."""
        return choose(scores, self.sink, self.recent, self.frames)

    def summarize(self, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """What the cache keeps of a written frame's keys to score it later (``key_means``)."""
        return key_means(key, cos, sin)

    def score(self, query: torch.Tensor, means: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The chunk's mean logit on each cached frame (``scores``)."""
        return scores(query, means, cos, sin)


def choose(scores: torch.Tensor, sink: int, recent: int, frames: int) -> torch.Tensor | None:
    """The sink, the recent and the ``frames`` middle frames of highest score, per (B, H), ascending."""
    batch, heads, cached = scores.shape
    sink, recent = min(sink, cached), min(recent, cached - min(sink, cached))
    middle = scores[..., sink : cached - recent]  # (B, H, candidates)
    if middle.shape[-1] <= frames:
        return None
    chosen = middle.topk(frames, dim=-1).indices + sink  # (B, H, frames)
    always = torch.cat([torch.arange(sink), torch.arange(cached - recent, cached)]).to(scores.device)
    return torch.cat([always.expand(batch, heads, -1), chosen], dim=-1).sort(dim=-1).values


def key_means(key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """key: (B, H, frames, tokens, dim) before RoPE; cos, sin: (1, 1, tokens, dim), the tables of a
    frame at temporal position 0 (spatial rotation only). The mean of each frame's rotated keys,
    (B, H, frames, dim) float32."""
    return rotate(key.float(), cos, sin).mean(dim=3)


def scores(query: torch.Tensor, means: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """query: (B, H, tokens, dim) of the chunk, rotated; means: (B, H, frames, dim) from ``key_means``;
    cos, sin: (1, 1, frames, dim), each frame's temporal rotation at its current position (the
    spatial parts at 0). The mean logit between the chunk and each frame, (B, H, frames) float32."""
    query_mean = query.float().mean(dim=2, keepdim=True)  # (B, H, 1, dim)
    return (rotate(means, cos, sin) * query_mean).sum(dim=-1)


def apply(model: torch.nn.Module, config: SparseConfig) -> Handle:
    return apply_sparse(model, config)


__all__ = ["SparseConfig", "apply", "choose", "key_means", "scores"]
