"""Exact training targets from a clip's ClipSpec: what the judge must read back."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cadence.judge.model import COUNTS, PAIR_INDEX, PAIRS
from cadence.reference import data

IGNORE = -100  # cross_entropy's ignore_index: no size/motion target where a pair is absent

# A frame of an object that grows or shrinks does not show its captioned size (the size is
# the clip's mean scale), so frame-level size targets skip those objects.
_SIZE_CHANGES = ("grows", "shrinks")


@dataclass
class Targets:
    presence: torch.Tensor  # (B, pairs) float 0/1
    size: torch.Tensor  # (B, pairs) long, IGNORE where absent
    motion: torch.Tensor  # (B, pairs) long, IGNORE where absent
    count: torch.Tensor  # (B,) index into COUNTS
    background: torch.Tensor  # (B,)
    background_colour: torch.Tensor  # (B,)

    def repeat_frames(self, frames: int) -> Targets:
        """The same targets for each of ``frames`` frames of every clip (B*frames rows)."""
        return Targets(*(t.repeat_interleave(frames, 0) for t in vars(self).values()))


def targets(specs: list[data.ClipSpec], frame_level: bool = False, device="cpu") -> Targets:
    """Targets of each spec; frame_level drops the size of objects that grow or shrink."""
    b = len(specs)
    presence = torch.zeros(b, len(PAIRS))
    size = torch.full((b, len(PAIRS)), IGNORE, dtype=torch.long)
    motion = torch.full((b, len(PAIRS)), IGNORE, dtype=torch.long)
    for row, spec in enumerate(specs):
        for obj in spec.objects:
            pair = PAIR_INDEX[obj.shape, obj.colour]
            presence[row, pair] = 1.0
            if not (frame_level and obj.motion in _SIZE_CHANGES):
                size[row, pair] = data.SIZES.index(obj.size)
            motion[row, pair] = data.MOTIONS.index(obj.motion)
    count = torch.tensor([COUNTS.index(len(s.objects)) for s in specs])
    background = torch.tensor([data.BACKGROUNDS.index(s.background) for s in specs])
    colour = torch.tensor([list(data.COLOURS).index(s.background_colour) for s in specs])
    return Targets(*(t.to(device) for t in (presence, size, motion, count, background, colour)))
