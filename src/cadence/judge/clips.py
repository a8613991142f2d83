"""Clip files and folders for ``cadence judge``: read what cadence writes (GIF, animated PNG,
MP4 through imageio's ffmpeg plugin) back into pixels, and find each clip's caption.

A file of one frame is an image (3, H, W); of several, a video (T, 3, H, W); pixels in
[-1, 1]. GIF writers merge identical consecutive frames into one longer frame, so frames
are repeated by their duration over the shortest one.

A clip's caption, in this order: ``--prompt`` (every clip); ``--prompts FILE`` (one
``file-name<TAB>caption`` line per clip); the file name itself, with ``-`` and ``_`` read as
spaces (``a-small-red-square-moves-left-over-a-blue-gradient.gif``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SUFFIXES = (".gif", ".png", ".mp4")


def clip_files(path: Path) -> list[Path]:
    """The clip files ``path`` names: itself, or a folder's clip files (sorted); refused
    with the reason when there are none."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{str(path)!r} does not exist; give a clip file ({', '.join(SUFFIXES)}) or a folder of them")
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise ValueError(f"{str(path)!r} is not a clip file; valid: {', '.join(SUFFIXES)}")
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise ValueError(f"folder {str(path)!r} holds no clip files ({', '.join(SUFFIXES)})")
    return files


def read_clip(path: Path) -> torch.Tensor:
    """-> (3, H, W) for one frame, (T, 3, H, W) for several; float32 in [-1, 1]."""
    path = Path(path)
    try:
        frames = _read_mp4(path) if path.suffix.lower() == ".mp4" else _read_pil(path)
    except (OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"cannot read {str(path)!r} as a clip: {error}") from None
    pixels = torch.from_numpy(np.stack(frames)).float().permute(0, 3, 1, 2) / 127.5 - 1  # (T, 3, H, W)
    return pixels[0] if pixels.shape[0] == 1 else pixels


def _read_pil(path: Path) -> list[np.ndarray]:
    from PIL import Image, ImageSequence

    with Image.open(path) as image:
        frames = [(np.asarray(f.convert("RGB")), f.info.get("duration") or 0) for f in ImageSequence.Iterator(image)]
    shortest = min((d for _, d in frames if d), default=0)
    repeats = [max(1, round(d / shortest)) if shortest else 1 for _, d in frames]
    return [frame for (frame, _), count in zip(frames, repeats) for _ in range(count)]


def _read_mp4(path: Path) -> list[np.ndarray]:
    import imageio.v2 as imageio

    try:
        return [np.asarray(frame)[..., :3] for frame in imageio.mimread(path, format="FFMPEG", memtest=False)]
    except ImportError as error:  # imageio without its ffmpeg plugin
        raise ValueError(f"reading MP4 needs imageio-ffmpeg ({error}); give a GIF or PNG instead") from None


def caption_from_name(path: Path) -> str:
    return Path(path).stem.replace("-", " ").replace("_", " ")


def captions_file(path: Path) -> dict[str, str]:
    """``name<TAB>caption`` lines -> {name: caption}; refused naming the bad line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--prompts {str(path)!r} does not exist; give a file of 'file-name<TAB>caption' lines")
    captions = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        name, tab, caption = line.partition("\t")
        if not tab or not name.strip() or not caption.strip():
            raise ValueError(f"--prompts {str(path)!r} line {number} is {line!r}; expected 'file-name<TAB>caption'")
        captions[name.strip()] = caption.strip()
    if not captions:
        raise ValueError(f"--prompts {str(path)!r} holds no 'file-name<TAB>caption' lines")
    return captions


def captions_for(files: list[Path], prompt: str | None, prompts: Path | None) -> list[str]:
    if prompt is not None:
        return [prompt] * len(files)
    if prompts is not None:
        table = captions_file(prompts)
        missing = [f.name for f in files if f.name not in table]
        if missing:
            raise ValueError(f"--prompts {str(prompts)!r} has no caption for {', '.join(map(repr, missing[:3]))}")
        return [table[f.name] for f in files]
    return [caption_from_name(f) for f in files]
