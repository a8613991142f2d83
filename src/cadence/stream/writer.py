"""Writing a stream's video as it is generated: a file that a player opens while it grows, and
that stays playable when the stream stops early (Ctrl-C, a killed process).

MP4 (:class:`Mp4Writer`): each chunk's frames are piped into ffmpeg (imageio-ffmpeg's binary),
which writes a fragmented MP4 (``-movflags frag_keyframe+empty_moov+default_base_moof``): the
header comes first with an empty ``moov``, and every fragment after it (``moof`` + ``mdat``) is
whole on its own, so the file decodes up to its last complete fragment at any moment.
``-flush_packets 1`` sends each fragment to the disk as it is muxed (without it ffmpeg buffers
32 KiB, and a small stream's file stays empty for a long while); x264's ``zerolatency`` tune
drops the look-ahead and B-frames that would hold dozens of frames back. Measured on ffmpeg 7:
the growing file decodes up to the frame before the last one piped (the muxer closes a frame's
fragment when the next frame arrives); once the input is closed, every frame is there. ffmpeg
runs in a session of its own, so a Ctrl-C at the terminal reaches only Python, which closes
ffmpeg's input; a killed Python closes it too (the pipe's end), and ffmpeg then finishes the
file with every frame it was given.

GIF (:class:`GifWriter`, where ffmpeg is missing): rewritten whole after every chunk under a
temporary name and renamed over the file, so the file is always a complete GIF. Every frame is
held and encoded again each chunk, so the cost grows with the square of the length: for short
streams only, and refused past ``GIF_MAX_FRAMES``.

Both take frames as (T, H, W, 3) uint8 arrays; this module needs neither torch nor a model.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

SUFFIXES = (".mp4", ".gif")
# A GIF is re-encoded whole after every chunk; 600 frames (75 s of ref-video at 8 fps) is where
# that rewriting starts to take longer than the generation of a small model's chunk.
GIF_MAX_FRAMES = 600


class WriterError(RuntimeError):
    """ffmpeg stopped writing the file (a full disk, killed)."""


def has_ffmpeg() -> bool:
    if importlib.util.find_spec("imageio_ffmpeg") is None:
        return False
    import imageio_ffmpeg

    try:
        imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError:  # the package without its binary
        return False
    return True


def check_out(path: Path) -> None:
    """Refuse, before anything is generated, an output the stream could not write: a suffix it
    does not write, MP4 without ffmpeg, a folder that does not exist or cannot be written, a path
    that is a folder."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        found = f"not {path.suffix!r}" if path.suffix else "and it has no extension"
        raise ValueError(f"--out {str(path)!r}: a stream is written as {' or '.join(SUFFIXES)}, {found}")
    if suffix == ".mp4" and not has_ffmpeg():
        raise ValueError(
            f"--out {str(path)!r}: a growing MP4 needs ffmpeg (pip install imageio-ffmpeg); or write a "
            f".gif (short streams: at most {GIF_MAX_FRAMES} frames)"
        )
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(
            f"--out {str(path)!r}: {str(folder)!r} is not an existing folder; valid: a file in an existing, "
            "writable folder"
        )
    if path.is_dir():
        raise ValueError(f"--out {str(path)!r} is a folder; valid: a file name ending in {' or '.join(SUFFIXES)}")
    try:  # os.access answers yes to root whatever the mode: write a probe instead
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(
            f"--out {str(path)!r}: the folder {str(folder)!r} is not writable "
            f"({error.strerror or error}); valid: a file in an existing, writable folder"
        ) from None


def check_length(path: Path, frames: int) -> None:
    """Refuse a GIF too long to rewrite after every chunk."""
    if path.suffix.lower() == ".gif" and frames > GIF_MAX_FRAMES:
        raise ValueError(
            f"--out {str(path)!r}: {frames} frames is too long for a GIF, which is rewritten whole after "
            f"every chunk; valid: at most {GIF_MAX_FRAMES} frames, or an .mp4 (pip install imageio-ffmpeg)"
        )


def open_writer(path: Path, fps: float) -> Mp4Writer | GifWriter:
    return Mp4Writer(path, fps) if path.suffix.lower() == ".mp4" else GifWriter(path, fps)


class _Writer:
    def __init__(self, path: Path, fps: float):
        self.path, self.fps = Path(path), fps
        self.frames = 0  # frames written so far
        self.shape: tuple[int, int] | None = None  # (height, width) of every frame

    def _check(self, frames: np.ndarray) -> np.ndarray:
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames of {frames.dtype} {frames.shape}; valid: uint8 (T, H, W, 3)")
        if self.shape is None:
            self.shape = frames.shape[1:3]
        elif frames.shape[1:3] != self.shape:
            raise ValueError(
                f"frames of {frames.shape[1]} x {frames.shape[2]} after {self.shape[0]} x "
                f"{self.shape[1]}: a video keeps one size"
            )
        return np.ascontiguousarray(frames)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Mp4Writer(_Writer):
    """A fragmented MP4 that grows by every chunk written (module docstring)."""

    def __init__(self, path: Path, fps: float):
        super().__init__(path, fps)
        self.process: subprocess.Popen | None = None
        # ffmpeg's messages, in a file: a pipe nobody reads could fill and stall it; closed by close()
        self.log = tempfile.TemporaryFile()  # noqa: SIM115

    def _start(self, height: int, width: int) -> None:
        import imageio_ffmpeg

        # a keyframe a second (-g): a player seeking the growing file finds one within a second
        encode = f"-an -c:v libx264 -preset veryfast -tune zerolatency -pix_fmt yuv420p -g {max(1, round(self.fps))}"
        mux = "-movflags frag_keyframe+empty_moov+default_base_moof -flush_packets 1 -f mp4"
        source = f"-f rawvideo -pix_fmt rgb24 -s {width}x{height} -r {self.fps:g} -i -"
        command = [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-y",
            "-loglevel",
            "error",
            *source.split(),
            *encode.split(),
            *mux.split(),
            str(self.path),
        ]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self.log, start_new_session=True
        )

    def write(self, frames: np.ndarray) -> None:
        frames = self._check(frames)
        # yuv420p takes even sides: pad by repeating the last row / column, never resize
        height, width = frames.shape[1:3]
        frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
        if self.process is None:
            self._start(*frames.shape[1:3])
        try:
            self.process.stdin.write(frames.tobytes())
            self.process.stdin.flush()
        except BrokenPipeError:
            process, self.process = self.process, None  # close() then has nothing to report twice
            process.wait()
            raise WriterError(
                f"ffmpeg stopped writing {self.path} after {self.frames} frames: {self._log()}"
            ) from None
        self.frames += len(frames)

    def close(self) -> None:
        """Close ffmpeg's input and wait for it to finish the file."""
        process, self.process = self.process, None
        if process is not None:
            try:
                process.stdin.close()
            except BrokenPipeError:
                pass
            process.wait()
        message = self._log() if process is not None and process.returncode else None
        self.log.close()
        if message is not None:
            raise WriterError(f"ffmpeg exited with {process.returncode} writing {self.path}: {message}")

    def _log(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace").strip() or "no message"


class GifWriter(_Writer):
    """A GIF rewritten whole after every chunk (module docstring)."""

    def __init__(self, path: Path, fps: float):
        super().__init__(path, fps)
        self.held: list[np.ndarray] = []

    def write(self, frames: np.ndarray) -> None:
        from PIL import Image

        self.held.extend(self._check(frames))
        if len(self.held) > GIF_MAX_FRAMES:
            raise ValueError(f"{len(self.held)} frames is over the GIF writer's {GIF_MAX_FRAMES}; write an .mp4")
        images = [Image.fromarray(frame) for frame in self.held]
        partial = self.path.with_name(f".{self.path.name}.partial")
        # PIL merges equal consecutive frames into one longer frame; playback is the same
        images[0].save(
            partial,
            format="GIF",
            save_all=True,
            append_images=images[1:],
            duration=max(1, round(1000 / self.fps)),
            loop=0,
        )
        os.replace(partial, self.path)
        self.frames = len(self.held)

    def close(self) -> None:
        self.held = []
        self.path.with_name(f".{self.path.name}.partial").unlink(missing_ok=True)  # a save cut by Ctrl-C
