"""The judge network: reads a clip of the procedural world back into caption attributes.

Two objects in a clip have no natural order, so objects are read by query: one learned
query per (shape, colour) pair attends over the clip's feature map and predicts whether
that pair is present, and if so its size and motion. The clip-level heads read the object
count and the background (kind and colour) from pooled features.

    clip (B, 3, T=8, 32, 32) in [-1, 1]
      -> frame encoder (2D convs, shared over frames)       -> (B, 64, T, 8, 8)
      |    -> frame reader: per frame, pair queries + pooled -> presence, size, count, background
      -> motion encoder (3D convs over frames x rows x cols) -> (B, 96, T/2, 4, 4)
           -> pooled: the features FD compares (they see motion)
           -> clip reader: pair queries + pooled             -> presence, size, motion, count, background

The frame reader (no motion) scores single images (ref-image) and the per-window
consistency of long videos; the clip reader scores videos.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cadence.reference import data

PAIRS = tuple((shape, colour) for shape in data.SHAPES for colour in data.COLOURS)  # the object queries
PAIR_INDEX = {pair: i for i, pair in enumerate(PAIRS)}
COUNTS = (1, 2)
# The judge's input: every clip is resampled to this (resample). 8 frames sample each motion
# often enough (a bounce's two hops, half a turn) at half the cost of 16 on a 2-core CPU.
FRAMES, SIZE = 8, 32


@dataclass
class Reading:
    """Logits of one reader; ``motion`` is None for the frame reader. Batch B (clips or frames)."""

    presence: torch.Tensor  # (B, pairs)
    size: torch.Tensor  # (B, pairs, sizes)
    motion: torch.Tensor | None  # (B, pairs, motions)
    count: torch.Tensor  # (B, counts)
    background: torch.Tensor  # (B, backgrounds)
    background_colour: torch.Tensor  # (B, colours)


def _conv2d(inp: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True))


def _conv3d(inp: int, out: int, kernel, stride=1) -> nn.Sequential:
    padding = tuple(k // 2 for k in kernel)
    return nn.Sequential(nn.Conv3d(inp, out, kernel, stride=stride, padding=padding, bias=False), nn.BatchNorm3d(out),
                         nn.ReLU(inplace=True))


class _Reader(nn.Module):
    """Pair queries attend over a feature map; pooled features give the clip-level answers."""

    def __init__(self, channels: int, positions: int, motions: bool):
        super().__init__()
        self.position = nn.Parameter(torch.randn(positions, channels) * 0.02)
        self.queries = nn.Parameter(torch.randn(len(PAIRS), channels) * 0.02)
        self.attend = nn.MultiheadAttention(channels, 4, batch_first=True)
        self.sizes, self.motions = len(data.SIZES), len(data.MOTIONS) if motions else 0
        self.per_pair = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(inplace=True),
                                      nn.Linear(channels, 1 + self.sizes + self.motions))
        self.clip_level = nn.Sequential(nn.Linear(2 * channels, channels), nn.ReLU(inplace=True),
                                        nn.Linear(channels, len(COUNTS) + len(data.BACKGROUNDS) + len(data.COLOURS)))
        # Presence also straight from the pooled features: "some red", "some square corners"
        # show there at once, while the queries still learn where to look.
        self.presence_from_pooled = nn.Linear(2 * channels, len(PAIRS))

    def forward(self, features: torch.Tensor, pooled: torch.Tensor) -> Reading:
        tokens = features.flatten(2).transpose(1, 2) + self.position  # (B, positions, C)
        queries = self.queries.expand(tokens.shape[0], -1, -1)  # (B, pairs, C)
        read, _ = self.attend(queries, tokens, tokens, need_weights=False)
        per_pair = self.per_pair(read + queries)  # (B, pairs, 1 + sizes + motions)
        counts, kinds = len(COUNTS), len(data.BACKGROUNDS)
        level = self.clip_level(pooled)
        return Reading(
            presence=per_pair[..., 0] + self.presence_from_pooled(pooled), size=per_pair[..., 1:1 + self.sizes],
            motion=per_pair[..., 1 + self.sizes:] if self.motions else None,
            count=level[:, :counts], background=level[:, counts:counts + kinds],
            background_colour=level[:, counts + kinds:],
        )


def pool(features: torch.Tensor) -> torch.Tensor:
    """(B, C, ...) -> (B, 2C): mean and max over every position."""
    flat = features.flatten(2)
    return torch.cat([flat.mean(-1), flat.amax(-1)], 1)


class Judge(nn.Module):
    """About 0.6 M parameters; the card (weights/README.md) gives its accuracy."""

    frame_channels, motion_channels = 64, 96

    def __init__(self):
        super().__init__()
        c = self.frame_channels
        self.frame_encoder = nn.Sequential(
            _conv2d(3, 16), nn.MaxPool2d(2), _conv2d(16, 32), nn.MaxPool2d(2), _conv2d(32, c),
        )  # (N, 3, 32, 32) -> (N, 64, 8, 8)
        self.motion_encoder = nn.Sequential(
            _conv3d(c, c, (3, 1, 1)),  # along time only: how each place changes
            nn.MaxPool3d((1, 2, 2)),
            _conv3d(c, self.motion_channels, (3, 3, 3), stride=(2, 1, 1)),
            _conv3d(self.motion_channels, self.motion_channels, (3, 3, 3)),
        )  # (B, 64, 8, 8, 8) -> (B, 96, 4, 4, 4)
        self.frame_reader = _Reader(c, 8 * 8, motions=False)
        self.clip_reader = _Reader(self.motion_channels, (FRAMES // 2) * 4 * 4, motions=True)

    def frame_features(self, clips: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, 32, 32) -> (B, 64, T, 8, 8)."""
        b, c, t, h, w = clips.shape
        frames = clips.transpose(1, 2).reshape(b * t, c, h, w)
        encoded = self.frame_encoder(frames)  # (B*T, 64, 8, 8)
        return encoded.reshape(b, t, *encoded.shape[1:]).transpose(1, 2)

    def read_frames(self, frame_features: torch.Tensor) -> Reading:
        """(B, 64, T, 8, 8) -> a Reading of B*T frames (no motion)."""
        b, c, t, h, w = frame_features.shape
        frames = frame_features.transpose(1, 2).reshape(b * t, c, h, w)
        return self.frame_reader(frames, pool(frames))

    def motion_features(self, frame_features: torch.Tensor) -> torch.Tensor:
        """(B, 64, 8, 8, 8) -> (B, 96, 4, 4, 4)."""
        return self.motion_encoder(frame_features)

    def read_clip(self, motion_features: torch.Tensor) -> tuple[Reading, torch.Tensor]:
        """-> (the clip's Reading, its pooled features (B, 192): what FD compares)."""
        pooled = pool(motion_features)
        return self.clip_reader(motion_features, pooled), pooled

    def forward(self, clips: torch.Tensor) -> tuple[Reading, Reading, torch.Tensor]:
        """(B, 3, 8, 32, 32) -> (clip reading, frame reading of B*8 frames, pooled features)."""
        frame_features = self.frame_features(clips)
        clip, pooled = self.read_clip(self.motion_features(frame_features))
        return clip, self.read_frames(frame_features), pooled


def resample(clips: torch.Tensor, frames: int | None = FRAMES) -> torch.Tensor:
    """(B, 3, T, H, W) in [-1, 1], any T and H x W -> (B, 3, frames, 32, 32).

    Time: frames taken at evenly spaced indices (nearest), so a clip of any length is read
    as covering the whole motion once; a clip shorter than ``frames`` repeats frames.
    Space: bilinear with antialiasing (area-like when shrinking), to 32 x 32; a non-square
    frame is stretched. ``frames=None`` keeps every frame (the frame reader, windows).
    """
    b, c, t, h, w = clips.shape
    if frames is not None and t != frames:
        index = torch.linspace(0, t - 1, frames).round().long().to(clips.device)
        clips = clips.index_select(2, index)
        t = frames
    if (h, w) != (SIZE, SIZE):
        flat = clips.transpose(1, 2).reshape(b * t, c, h, w).float()
        flat = F.interpolate(flat, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
        clips = flat.reshape(b, t, c, SIZE, SIZE).transpose(1, 2)
    return clips.float().clamp(-1, 1)
