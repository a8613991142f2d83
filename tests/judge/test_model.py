"""The judge's pieces that need no trained weights: resampling, targets, read-back, FD."""

import numpy as np
import pytest
import scipy.linalg
import torch

from cadence.judge import labels
from cadence.judge.model import (
    FRAMES,
    PAIR_INDEX,
    PAIRS,
    SIZE,
    Judge,
    Reading,
    resample,
)
from cadence.judge.readback import IMAGE_ATTRIBUTES, VIDEO_ATTRIBUTES, read_back, tally
from cadence.judge.score import frechet_distance
from cadence.reference import data

TWO = data.ClipSpec((data.ObjectSpec("square", "red", "small", "moves left"),
                     data.ObjectSpec("ring", "white", "large", "grows")), "gradient", "blue")


def test_resample_takes_any_length_and_size_to_the_judges_input():
    clip = torch.linspace(-1, 1, 20)[None, None, :, None, None].expand(2, 3, 20, 24, 40)  # frame value = its time
    out = resample(clip)
    assert out.shape == (2, 3, FRAMES, SIZE, SIZE)
    times = out[0, 0, :, 0, 0]
    assert times[0].item() == pytest.approx(-1) and times[-1].item() == pytest.approx(1)  # first and last kept
    assert (times[1:] > times[:-1]).all()  # in order
    short = resample(torch.zeros(1, 3, 3, 32, 32))
    assert short.shape == (1, 3, FRAMES, SIZE, SIZE)  # a shorter clip repeats frames


def test_the_judge_maps_a_batch_to_readings_and_features():
    judge = Judge().eval()
    clip, frames, pooled = judge(torch.zeros(2, 3, FRAMES, SIZE, SIZE))
    assert clip.presence.shape == (2, len(PAIRS)) and clip.motion.shape == (2, len(PAIRS), len(data.MOTIONS))
    assert frames.presence.shape == (2 * FRAMES, len(PAIRS)) and frames.motion is None
    assert pooled.shape == (2, 2 * Judge.motion_channels)
    assert sum(p.numel() for p in judge.parameters()) * 4 < 5 * 2**20  # weights under 5 MB


def test_targets_mark_both_objects_and_only_them():
    target = labels.targets([TWO])
    square, ring = PAIR_INDEX["square", "red"], PAIR_INDEX["ring", "white"]
    assert target.presence[0].nonzero().flatten().tolist() == sorted([square, ring])
    assert target.size[0, square] == data.SIZES.index("small") and target.motion[0, ring] == data.MOTIONS.index("grows")
    assert (target.size[0] != labels.IGNORE).sum() == 2
    assert target.count.tolist() == [1] and target.background_colour.tolist() == [list(data.COLOURS).index("blue")]
    frame_level = labels.targets([TWO], frame_level=True)
    assert frame_level.size[0, ring] == labels.IGNORE  # a growing ring shows no single size in one frame


def _reading_of(spec, video=True, **wrong):
    """Logits that read ``spec`` exactly, with the named fields replaced by wrong answers."""
    target = labels.targets([spec])
    onehot = lambda index, classes: torch.nn.functional.one_hot(index.clamp(min=0), classes).float() * 10
    reading = Reading(
        presence=target.presence * 20 - 10, size=onehot(target.size, 2), motion=onehot(target.motion, 10) if video else None,
        count=onehot(target.count, 2), background=onehot(target.background, 3),
        background_colour=onehot(target.background_colour, 8),
    )
    for name, value in wrong.items():
        setattr(reading, name, value)
    return reading


def test_an_exact_reading_reads_back_every_attribute():
    found = read_back(_reading_of(TWO), [TWO], video=True)
    assert tuple(found[0]) == VIDEO_ATTRIBUTES
    assert tally(found) == {**{a: 1.0 for a in VIDEO_ATTRIBUTES}, "all": 1.0}
    image = read_back(_reading_of(TWO, video=False), [TWO], video=False)
    assert tuple(image[0]) == IMAGE_ATTRIBUTES and tally(image)["all"] == 1.0


def test_a_wrong_motion_costs_only_motion_and_a_missing_object_its_attributes():
    exact = _reading_of(TWO)
    motion = exact.motion.clone()
    motion[0, PAIR_INDEX["square", "red"]] = torch.nn.functional.one_hot(torch.tensor(1), 10) * 10  # "moves right"
    shares = tally(read_back(_reading_of(TWO, motion=motion), [TWO], video=True))
    assert shares["motion"] == 0.5 and all(shares[a] == 1.0 for a in VIDEO_ATTRIBUTES if a != "motion")
    presence = exact.presence.clone()
    presence[0, PAIR_INDEX["ring", "white"]] = -10  # the ring is not seen: no white, no ring, no size or motion
    shares = tally(read_back(_reading_of(TWO, presence=presence), [TWO], video=True))
    assert shares["shape"] == shares["colour"] == shares["size"] == shares["motion"] == 0.5
    assert shares["background"] == 1.0


def _scipy_fd(a, b):
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_frechet_distance_matches_the_fid_formula_and_is_zero_on_itself():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(200, 6, generator=generator, dtype=torch.float64)
    b = torch.randn(150, 6, generator=generator, dtype=torch.float64) * 1.5 + 0.3
    assert frechet_distance(a, b) == pytest.approx(_scipy_fd(a.numpy(), b.numpy()), rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, a + 2.0) == pytest.approx(6 * 4.0, rel=1e-9)  # a mean shift of 2 in 6 dimensions
    with pytest.raises(ValueError, match="at least 2 clips"):
        frechet_distance(a[:1], b)
