"""Quality of generated clips in the procedural world, as the judge reads them:

- ``adherence``: the share of caption attributes the judge reads back from each clip
  (readback.py says which), pooled over clips, and per attribute;
- ``fd``: the Fréchet distance between the judge's pooled motion features (the 3D convs'
  output, so they see motion, not only frames) of the generated clips and of freshly
  rendered clips of the same captions, several render seeds each: an FVD of this world
  (for images, the frame reader's pooled features against rendered images);
- ``consistency``: for long videos and streams, per window of frames, the share of
  frame-to-frame steps over which the frame reader's identity read (which (shape, colour)
  pairs are present, and the object count) stays the same.

Clips are cadence's pixels in [-1, 1]: a video (T, 3, H, W), an image (3, H, W). Any T, H,
W (H, W >= 8) is accepted and resampled to the judge's input (model.resample says how).
Videos need video captions (with motions), images take either form (motions ignored).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from cadence.judge import checkpoint
from cadence.judge.model import FRAMES, SIZE, Judge, pool, resample
from cadence.judge.readback import present, read_back, tally
from cadence.reference import data

MIN_SIDE = 8
RENDER_SEEDS = (0, 1, 2, 3)  # renders per caption that FD compares against
CONSISTENCY_WINDOW = 16  # frames per consistency window


def check_clip(clip, what: str = "clip") -> None:
    """Refuse anything but a finite video (T, 3, H, W) or image (3, H, W), H and W >= 8."""
    if not isinstance(clip, torch.Tensor):
        raise ValueError(f"{what} is a {type(clip).__name__}; expected a torch.Tensor video (T, 3, H, W) or image (3, H, W)")
    shape = tuple(clip.shape)
    if clip.dim() not in (3, 4) or shape[-3] != 3 or min(shape[-2:]) < MIN_SIDE or (clip.dim() == 4 and shape[0] < 1):
        raise ValueError(f"{what} has shape {shape}; expected a video (T, 3, H, W) or an image (3, H, W), "
                         f"RGB, with H and W >= {MIN_SIDE}")
    if not torch.isfinite(clip).all():
        raise ValueError(f"{what} holds NaN or Inf values; expected pixels in [-1, 1]")


def parse_captions(captions: list[str], videos: list[bool]) -> list[data.ClipSpec]:
    """Each caption in the grammar (a video needs motions; an image takes either form)."""
    return [data.parse_caption(text, video=True if video else None) for text, video in zip(captions, videos)]


def _batch(clips: list[torch.Tensor], frames: int | None) -> torch.Tensor:
    """Clips of one shape -> (B, 3, frames, 32, 32) for the judge."""
    stacked = torch.stack([c if c.dim() == 4 else c[None] for c in clips]).transpose(1, 2)  # (B, 3, T, H, W)
    return resample(stacked.float(), frames)


def _groups(clips: list[torch.Tensor]) -> dict[tuple, list[int]]:
    """Indices of clips grouped by shape, so each group runs as one batch."""
    groups: dict[tuple, list[int]] = {}
    for index, clip in enumerate(clips):
        groups.setdefault(tuple(clip.shape), []).append(index)
    return groups


@dataclass
class Read:
    """What the judge read from clips: per clip, attribute -> read back per occurrence."""

    found: list[dict[str, list[bool]]]
    features: torch.Tensor  # (videos, 192) pooled motion features in the clips' order; without videos (images, 128)


@torch.no_grad()
def _read(judge: Judge, clips: list[torch.Tensor], specs: list[data.ClipSpec], chunk: int = 64) -> Read:
    found: list = [None] * len(clips)
    features: list = [None] * len(clips)
    device = next(judge.parameters()).device
    for shape, indices in _groups(clips).items():
        video = len(shape) == 4
        for start in range(0, len(indices), chunk):
            part = indices[start:start + chunk]
            batch = _batch([clips[i] for i in part], FRAMES if video else 1).to(device)
            frame_features = judge.frame_features(batch)
            if video:
                reading, pooled = judge.read_clip(judge.motion_features(frame_features))
            else:  # an image: the frame reader, and its pooled features (B, 128) for FD
                reading, pooled = judge.read_frames(frame_features), pool(frame_features)
            for k, (index, row) in enumerate(zip(part, read_back(reading, [specs[i] for i in part], video))):
                found[index] = row
                features[index] = pooled[k].double().cpu()
    # FD compares one kind: the videos' motion features when there are videos, else the images'.
    kind = 4 if any(clip.dim() == 4 for clip in clips) else 3
    return Read(found, torch.stack([f for f, clip in zip(features, clips) if clip.dim() == kind]))


def read(clips: list[torch.Tensor], captions: list[str], judge: Judge) -> Read:
    """Check the clips and captions (ValueError naming the bad one), then read them."""
    return _read(judge, clips, _check_inputs(clips, captions))


def reference_features(clips: list[torch.Tensor], captions: list[str], judge: Judge, seeds=RENDER_SEEDS):
    """Judge features of fresh renders of the clips' captions, shaped like the clips,
    ``len(seeds)`` per caption: FD's reference side. Videos when there are any, else images;
    None under two of them."""
    kind = 4 if any(clip.dim() == 4 for clip in clips) else 3
    videos = [(clip, data.parse_caption(text)) for clip, text in zip(clips, captions) if clip.dim() == kind]
    if len(videos) < 2:
        return None
    reference = rendered_like([clip for clip, _ in videos], [spec for _, spec in videos], seeds)
    return _read(judge, reference, [spec for _, spec in videos] * len(seeds)).features


def fd_against_renders(clips: list[torch.Tensor], captions: list[str], features: torch.Tensor, judge: Judge,
                       seeds=RENDER_SEEDS) -> float | None:
    """FD of the videos' (else the images') features against renders of their captions; None under two."""
    reference = reference_features(clips, captions, judge, seeds)
    return None if features is None or reference is None else frechet_distance(features, reference)


def adherence(clips: list[torch.Tensor], captions: list[str], judge: Judge | None = None) -> dict:
    """-> {"adherence": pooled share, "attributes": {attribute: share}, "per_clip": [share, ...]}."""
    judge = judge or checkpoint.load()
    return adherence_of(read(clips, captions, judge).found)


def adherence_of(found: list[dict[str, list[bool]]]) -> dict:
    """What ``read`` found -> the pooled share, the share per attribute and per clip (as ``adherence``)."""
    per_clip = [tally([row])["all"] for row in found]
    attributes: dict[str, list[bool]] = {}
    for row in found:
        for attribute, values in row.items():
            attributes.setdefault(attribute, []).extend(values)
    shares = {attribute: sum(v) / len(v) for attribute, v in attributes.items()}
    pooled = sum(sum(v) for v in attributes.values()) / sum(len(v) for v in attributes.values())
    return {"adherence": pooled, "attributes": shares, "per_clip": per_clip}


def _check_inputs(clips: list[torch.Tensor], captions: list[str]) -> list[data.ClipSpec]:
    if not clips:
        raise ValueError("no clips to judge: give at least one")
    if len(clips) != len(captions):
        raise ValueError(f"{len(clips)} clips but {len(captions)} captions: give one caption per clip")
    for index, clip in enumerate(clips):
        check_clip(clip, f"clip {index}")
    return parse_captions(captions, [clip.dim() == 4 for clip in clips])


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature rows a (N, D) and b (M, D):
    |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2), the FID/FVD formula. The trace of
    the matrix square root is taken from the eigenvalues of S_a^1/2 S_b S_a^1/2
    (symmetric, so exact in float64 even when the covariances are singular)."""
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"FD needs at least 2 clips on each side, got {a.shape[0]} and {b.shape[0]}")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def rendered_like(clips: list[torch.Tensor], specs: list[data.ClipSpec], seeds=RENDER_SEEDS) -> list[torch.Tensor]:
    """Fresh renders of each spec at its clip's frame count and size, ``len(seeds)`` each,
    in cadence's layout (T, 3, H, W), or (3, H, W) for an image: the reference side of FD."""
    rendered = []
    for seed in seeds:
        for index, (clip, spec) in enumerate(zip(clips, specs)):
            height, width = clip.shape[-2], clip.shape[-1]
            side = height if height == width else SIZE  # the renderer draws square frames
            seed_of_clip = seed * 100_003 + index
            if clip.dim() == 3:  # an image: a still frame at a random time, as ref-image is trained on
                rendered.append(data.render_images([spec], size=side, seed=seed_of_clip)[0])
                continue
            video = data.render([spec], frames=clip.shape[0], size=side, seed=seed_of_clip)[0]  # (3, T, H, W)
            rendered.append(video.transpose(0, 1))
    return rendered


def fd(clips: list[torch.Tensor], captions: list[str], judge: Judge | None = None, seeds=RENDER_SEEDS) -> float:
    """FD of generated videos against renders of their captions (``len(seeds)`` per caption)."""
    return judge_clips(clips, captions, judge, seeds)["fd"]


def judge_clips(clips: list[torch.Tensor], captions: list[str], judge: Judge | None = None,
                seeds=RENDER_SEEDS) -> dict:
    """Adherence (as ``adherence``) and, for two or more videos (or images), ``fd`` (else None)."""
    judge = judge or checkpoint.load()
    found = read(clips, captions, judge)
    result = adherence_of(found.found)
    result["fd"] = fd_against_renders(clips, captions, found.features, judge, seeds)
    result["clips"] = len(clips)
    return result


@torch.no_grad()
def consistency(video: torch.Tensor, judge: Judge | None = None, window: int = CONSISTENCY_WINDOW) -> dict:
    """Frame-to-frame stability of object identity in one video (T, 3, H, W) of any length.

    -> {"consistency": share over all steps, "windows": [{"start", "frames", "consistency",
    "count", "objects"}, ...]}: per window of ``window`` frames, the share of its steps
    whose read identity (present pairs and count) does not change, and its most common read.
    """
    check_clip(video, "video")
    if video.dim() != 4 or video.shape[0] < 2:
        raise ValueError(f"consistency needs a video of 2 or more frames, got shape {tuple(video.shape)}")
    if not isinstance(window, int) or window < 2:
        raise ValueError(f"window={window!r} must be an integer >= 2 frames")
    judge = judge or checkpoint.load()
    device = next(judge.parameters()).device
    identities = []
    for start in range(0, video.shape[0], 256):  # long streams in bounded chunks
        frames = _batch([video[start:start + 256]], None).to(device)  # (1, 3, t, 32, 32)
        reading = judge.read_frames(judge.frame_features(frames))
        seen = present(reading).flatten(1).cpu()
        counts = reading.count.argmax(-1).cpu()
        identities += [(tuple(row.nonzero().flatten().tolist()), int(c)) for row, c in zip(seen, counts)]
    windows, steps_same, steps = [], 0, 0
    for start in range(0, len(identities), window):
        part = identities[start:start + window + 1]  # the step into the next window belongs to this one
        same = [a == b for a, b in itertools.pairwise(part)]
        if not same:
            continue
        common = max(set(part), key=part.count)
        pairs = [f"{data.SHAPES[i // len(data.COLOURS)]}/{list(data.COLOURS)[i % len(data.COLOURS)]}" for i in common[0]]
        windows.append({"start": start, "frames": min(window, len(identities) - start),
                        "consistency": sum(same) / len(same), "count": common[1] + 1, "objects": pairs})
        steps_same, steps = steps_same + sum(same), steps + len(same)
    return {"consistency": steps_same / steps, "windows": windows}
