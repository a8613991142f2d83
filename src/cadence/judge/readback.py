"""Which caption attributes a judge Reading reads back: the core of adherence and of the
judge's own accuracy.

Per object of the caption: ``shape`` (some present pair has that shape), ``colour`` (some
present pair has that colour), ``size`` and ``motion`` (the pair (shape, colour) is present
and its size / motion is the caption's). Per clip: ``count``, ``background`` (kind) and
``background_colour``. A pair is present when its probability is above one half.
"""

from __future__ import annotations

import torch

from cadence.judge.model import COUNTS, PAIR_INDEX, Reading
from cadence.reference import data

VIDEO_ATTRIBUTES = ("shape", "colour", "size", "motion", "count", "background", "background_colour")
IMAGE_ATTRIBUTES = tuple(a for a in VIDEO_ATTRIBUTES if a != "motion")


def present(reading: Reading) -> torch.Tensor:
    """(B, shapes, colours) bool: which (shape, colour) pairs the judge sees."""
    return (reading.presence > 0).reshape(-1, len(data.SHAPES), len(data.COLOURS))


def read_back(reading: Reading, specs: list[data.ClipSpec], video: bool) -> list[dict[str, list[bool]]]:
    """Per spec: attribute -> one bool per occurrence (objects, or the clip), True when read back."""
    seen = present(reading).cpu()
    size = reading.size.argmax(-1).cpu()
    motion = reading.motion.argmax(-1).cpu() if video else None
    count = reading.count.argmax(-1).cpu()
    background = reading.background.argmax(-1).cpu()
    background_colour = reading.background_colour.argmax(-1).cpu()
    colours = list(data.COLOURS)
    results = []
    for row, spec in enumerate(specs):
        found: dict[str, list[bool]] = {a: [] for a in (VIDEO_ATTRIBUTES if video else IMAGE_ATTRIBUTES)}
        for obj in spec.objects:
            s, c = data.SHAPES.index(obj.shape), colours.index(obj.colour)
            pair = PAIR_INDEX[obj.shape, obj.colour]
            there = bool(seen[row, s, c])
            found["shape"].append(bool(seen[row, s].any()))
            found["colour"].append(bool(seen[row, :, c].any()))
            found["size"].append(there and int(size[row, pair]) == data.SIZES.index(obj.size))
            if video:
                found["motion"].append(there and int(motion[row, pair]) == data.MOTIONS.index(obj.motion))
        found["count"].append(COUNTS[int(count[row])] == len(spec.objects))
        found["background"].append(data.BACKGROUNDS[int(background[row])] == spec.background)
        found["background_colour"].append(colours[int(background_colour[row])] == spec.background_colour)
        results.append(found)
    return results


def tally(found: list[dict[str, list[bool]]]) -> dict[str, float]:
    """Share read back per attribute, and ``all``: over every attribute occurrence pooled."""
    shares, hits, total = {}, 0, 0
    for attribute in found[0]:
        values = [v for row in found for v in row[attribute]]
        shares[attribute] = sum(values) / len(values)
        hits, total = hits + sum(values), total + len(values)
    shares["all"] = hits / total
    return shares
