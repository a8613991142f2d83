"""Which frames the streaming KV cache keeps: the whole past up to a cap, a sliding window, or
attention sinks plus a sliding window.

- ``kv-full(cap_frames=N)``: every generated frame, as CausVid and Self-Forcing attend within their
  training length; past ``cap_frames`` a stream is refused (before it starts when its length is
  known), since memory and attention time grow with every chunk.
- ``kv-window(frames=W)``: the last W frames (Self-Forcing's rolling KV cache for long videos).
- ``kv-sink-window(sink=S, frames=W)``: the first S frames, kept for the whole stream, and the last
  W (StreamingLLM, Xiao et al. 2024: the first tokens soak up attention mass and must stay;
  LongLive, Yang et al. 2025, uses a frame sink of one chunk, 3 latent frames, and a 12-frame
  local window).

``frames`` counts cached frames, not the current chunk: a chunk attends to at most
``sink + frames`` cached frames plus itself. Kept frames are re-indexed 0..kept-1 for RoPE
(:mod:`cadence.accel.sequence._base`), so the sink sits right before the window whatever the
distance it was generated at. Where this differs from LongLive: LongLive trains its student with
the sink and window it streams with (and refreshes the cache on a prompt switch); with no trained
stream model yet, these are inference-time policies on whatever model is given, and quality is
not claimed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cadence.accel.registry import Handle, param
from cadence.accel.sequence._base import KVPolicyConfig, apply_policy


@dataclass(frozen=True)
class FullConfig(KVPolicyConfig):
    name = "kv-full"
    summary = "KV cache of every generated frame, up to a cap (CausVid / Self-Forcing within their length)"

    cap_frames: int = param(120, "most latent frames the cache may hold; a longer stream is refused", low=1)

    def keep(self, frames: list[int]) -> list[int]:
        self.require(len(frames) <= self.cap_frames,
                     f"the stream reached {len(frames)} cached frames, over cap_frames={self.cap_frames}; raise "
                     "cap_frames or use kv-window / kv-sink-window, whose memory stays flat")
        return list(frames)

    @property
    def max_frames(self) -> int:
        return self.cap_frames


@dataclass(frozen=True)
class WindowConfig(KVPolicyConfig):
    name = "kv-window"
    summary = "KV cache of the last `frames` latent frames (rolling KV cache)"

    frames: int = param(12, "latent frames kept, the most recent ones", low=1)

    def keep(self, frames: list[int]) -> list[int]:
        return list(frames[-self.frames:])

    @property
    def max_frames(self) -> int:
        return self.frames

    def check_chunk(self, frames_per_chunk: int) -> None:
        self.require(self.frames >= frames_per_chunk,
                     f"frames={self.frames} is shorter than one chunk (frames_per_chunk={frames_per_chunk}): the next "
                     f"chunk would not see all of the last one; valid: frames >= {frames_per_chunk}")


@dataclass(frozen=True)
class SinkWindowConfig(KVPolicyConfig):
    name = "kv-sink-window"
    summary = "KV cache of the first `sink` frames and the last `frames` (StreamingLLM / LongLive)"

    sink: int = param(3, "first latent frames kept for the whole stream (LongLive: one chunk, 3)", low=1,
                      why="sink=0 is the window policy")
    frames: int = param(12, "latent frames kept after the sink, the most recent ones (LongLive: 12)", low=1)

    def keep(self, frames: list[int]) -> list[int]:
        sink = frames[:self.sink]
        recent = [frame for frame in frames[-self.frames:] if frame not in sink]
        return sink + recent

    @property
    def max_frames(self) -> int:
        return self.sink + self.frames

    def check_chunk(self, frames_per_chunk: int) -> None:
        self.require(self.frames >= frames_per_chunk,
                     f"frames={self.frames} is shorter than one chunk (frames_per_chunk={frames_per_chunk}): the next "
                     f"chunk would not see all of the last one; valid: frames >= {frames_per_chunk}")


def apply(model: torch.nn.Module, config: KVPolicyConfig) -> Handle:
    return apply_policy(model, config)


POLICIES = (FullConfig, WindowConfig, SinkWindowConfig)

__all__ = ["POLICIES", "FullConfig", "SinkWindowConfig", "WindowConfig", "apply"]
