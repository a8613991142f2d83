"""Adherence, FD and consistency with the shipped judge, and the inputs they refuse."""

import pytest
import torch
import torch.nn.functional as F

from cadence.judge import checkpoint, score
from cadence.reference import data


@pytest.fixture(scope="module")
def judge():
    return checkpoint.load()


@pytest.fixture(scope="module")
def heldout():
    """Renders of 12 held-out captions, in cadence's layout (T, 3, H, W)."""
    captions = data.heldout_prompts(12)
    specs = [data.parse_caption(c) for c in captions]
    clips = [clip.transpose(0, 1) for clip in data.render(specs, frames=16, size=32, seed=77)]
    return clips, captions


BAD_CLIPS = {
    "five dimensions": (torch.zeros(1, 16, 3, 32, 32), "shape (1, 16, 3, 32, 32)"),
    "four channels": (torch.zeros(16, 4, 32, 32), "shape (16, 4, 32, 32)"),
    "channels last": (torch.zeros(16, 32, 32, 3), "shape (16, 32, 32, 3)"),
    "too small": (torch.zeros(16, 3, 4, 4), "H and W >= 8"),
    "nan": (torch.full((16, 3, 32, 32), float("nan")), "NaN or Inf values; expected pixels in [-1, 1]"),
    "not a tensor": ([[0.0]], "is a list"),
}


@pytest.mark.parametrize("case", BAD_CLIPS)
def test_a_clip_of_the_wrong_shape_is_refused_naming_it_and_the_valid_shapes(case):
    clip, fragment = BAD_CLIPS[case]
    with pytest.raises(ValueError) as refused:
        score.adherence([clip], ["a small red square moves left over a blue gradient"], judge=object())
    assert fragment in str(refused.value) and ("(T, 3, H, W)" in str(refused.value) or case == "nan")


def test_captions_outside_the_grammar_and_mismatched_lists_are_refused():
    video = torch.zeros(16, 3, 32, 32)
    with pytest.raises(ValueError, match="unknown words 'magenta'"):
        score.adherence([video], ["a small magenta square moves left over a blue gradient"], judge=object())
    with pytest.raises(ValueError, match="motion for every object"):
        score.adherence([video], ["a small red square over a blue gradient"], judge=object())
    with pytest.raises(ValueError, match="1 clips but 2 captions"):
        score.adherence([video], ["a"] * 2, judge=object())
    with pytest.raises(ValueError, match="no clips"):
        score.adherence([], [], judge=object())


def test_any_clip_size_and_length_is_read(judge, heldout):
    clips, captions = heldout
    long = F.interpolate(clips[0][None].transpose(1, 2), size=(24, 48, 48), mode="trilinear")[0].transpose(0, 1)
    result = score.judge_clips([long, clips[1][:5]], captions[:2], judge)
    assert result["clips"] == 2 and len(result["per_clip"]) == 2 and result["fd"] is not None
    image = score.adherence([clips[0][3]], [captions[0]], judge)  # one frame: an image, motion not asked
    assert "motion" not in image["attributes"]


def test_fd_is_none_for_a_single_video_and_renders_match_the_clip_shape(judge, heldout):
    clips, captions = heldout
    assert score.judge_clips(clips[:1], captions[:1], judge)["fd"] is None
    images = [clip[5] for clip in clips[:3]]  # single frames: FD over the frame reader's features
    assert score.judge_clips(images, [data.caption(data.parse_caption(c), video=False) for c in captions[:3]],
                             judge)["fd"] is not None
    rendered = score.rendered_like([clips[0][:10]], [data.parse_caption(captions[0])], seeds=(0, 1))
    assert [tuple(r.shape) for r in rendered] == [(10, 3, 32, 32)] * 2 and not torch.equal(*rendered)


def test_a_still_video_is_perfectly_consistent_and_windows_cover_it(judge, heldout):
    clips, _ = heldout
    still = clips[0][:1].expand(40, -1, -1, -1)  # one frame held for 40 frames
    result = score.consistency(still, judge, window=16)
    assert result["consistency"] == 1.0
    assert [w["start"] for w in result["windows"]] == [0, 16, 32] and result["windows"][-1]["frames"] == 8
    with pytest.raises(ValueError, match="window=1"):
        score.consistency(still, judge, window=1)
    with pytest.raises(ValueError, match="2 or more frames"):
        score.consistency(still[:1], judge)


def _noisy(clips, sigma):
    generator = torch.Generator().manual_seed(0)
    return [(c + sigma * torch.randn(c.shape, generator=generator)).clamp(-1, 1) for c in clips]


def _blurred(clips, width):
    kernel = torch.full((3, 1, width, width), 1.0 / width**2)
    return [F.conv2d(F.pad(c, [width // 2] * 4, mode="replicate"), kernel, groups=3) for c in clips]


def test_adherence_falls_and_fd_rises_as_samples_are_degraded(judge, heldout):
    """Added noise, blur and the wrong prompt, each at growing strength (fewer denoising
    steps: benchmarks/judge_quality.py, too slow for a test on the CPU)."""
    clips, captions = heldout
    wrong = captions[1:] + captions[:1]
    reference = score.reference_features(clips, captions, judge)  # the renders FD compares with, made once

    def metrics(degraded, text=captions):
        read = score.read(degraded, text, judge)
        hits = [v for found in read.found for values in found.values() for v in values]
        return sum(hits) / len(hits), score.frechet_distance(read.features, reference)

    clean = metrics(clips)
    for name, ladder in {
        "noise": [_noisy(clips, 0.25), _noisy(clips, 0.6)],
        "blur": [_blurred(clips, 3), _blurred(clips, 7)],
    }.items():
        steps = [clean] + [metrics(degraded) for degraded in ladder]
        assert [a for a, _ in steps] == sorted([a for a, _ in steps], reverse=True) and steps[-1][0] < clean[0], (name, steps)
        assert [f for _, f in steps] == sorted(f for _, f in steps) and steps[-1][1] > clean[1], (name, steps)
    assert metrics(clips, wrong)[0] < clean[0]
