"""The stream's video writer: a fragmented MP4 that decodes while it grows and after its writer
is killed, with every frame written; a GIF that is whole after every chunk; outputs that cannot
be written refused before anything is generated."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from cadence.stream import writer as writer_module
from cadence.stream.writer import GIF_MAX_FRAMES, GifWriter, Mp4Writer, check_length, check_out


def _chunk(frames: int, seed: int, side: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, side, side, 3), dtype=np.uint8)


def _until(condition, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_the_mp4_decodes_while_it_grows_and_holds_every_frame_once_closed(tmp_path, decoded_frames):
    path = tmp_path / "growing.mp4"
    with Mp4Writer(path, fps=8) as writer:
        for index in range(3):
            writer.write(_chunk(4, seed=index))
            # while ffmpeg runs, the file decodes up to the frame before the last one piped
            assert _until(lambda: decoded_frames(path) >= writer.frames - 1), decoded_frames(path)
            assert writer.process.poll() is None
    assert decoded_frames(path) == writer.frames == 12


def test_odd_sides_are_padded_and_a_size_change_is_refused(tmp_path, decoded_frames):
    path = tmp_path / "odd.mp4"
    with Mp4Writer(path, fps=8) as writer:
        writer.write(_chunk(2, seed=0, side=7))
        with pytest.raises(ValueError, match=r"frames of 8 x 8 after 7 x 7: a video keeps one size"):
            writer.write(_chunk(2, seed=1, side=8))
        with pytest.raises(ValueError, match=r"frames of float64 \(2, 7, 7, 3\); valid: uint8 \(T, H, W, 3\)"):
            writer.write(np.zeros((2, 7, 7, 3)))
    assert decoded_frames(path) == 2


KILLED = """
import importlib.util, sys, time
import numpy as np
spec = importlib.util.spec_from_file_location("writer", sys.argv[1])
writer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(writer)
out = writer.Mp4Writer(sys.argv[2], fps=8)
for seed in range(2):
    out.write(np.random.default_rng(seed).integers(0, 256, (5, 24, 24, 3), dtype=np.uint8))
print(out.process.pid, flush=True)
time.sleep(60)
"""


def _finished(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # exited, not yet reaped
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads a process's state from /proc")
def test_a_killed_stream_leaves_a_file_with_every_frame_written(tmp_path, decoded_frames):
    """The writing process is killed (SIGKILL: nothing of Python runs): ffmpeg, in its own
    session, sees its input close and finishes the file."""
    path = tmp_path / "killed.mp4"
    # the writer needs neither torch nor cadence: the script loads its file alone and starts at once
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED, writer_module.__file__, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        ffmpeg = int(process.stdout.readline())
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert _until(lambda: _finished(ffmpeg)), "ffmpeg did not finish after its writer was killed"
    assert decoded_frames(path) == 10


def test_the_gif_is_whole_after_every_chunk(tmp_path):
    path = tmp_path / "short.gif"
    with GifWriter(path, fps=8) as writer:
        for index in range(3):
            writer.write(_chunk(2, seed=index))
            with Image.open(path) as gif:
                assert gif.n_frames == writer.frames == 2 * (index + 1)
    assert not list(tmp_path.glob(".*partial*"))


def test_outputs_it_cannot_write_are_refused(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"x.avi': a stream is written as .mp4 or .gif, not '.avi'"):
        check_out(tmp_path / "x.avi")
    with pytest.raises(ValueError, match=r"is not an existing folder; valid: a file in an existing, writable folder"):
        check_out(tmp_path / "missing" / "x.mp4")
    (tmp_path / "folder.mp4").mkdir()
    with pytest.raises(ValueError, match=r"folder.mp4' is a folder; valid: a file name ending in .mp4 or .gif"):
        check_out(tmp_path / "folder.mp4")
    with pytest.raises(
        ValueError,
        match=rf"{GIF_MAX_FRAMES + 1} frames is too long for a GIF.*at most "
        rf"{GIF_MAX_FRAMES} frames, or an .mp4",
    ):
        check_length(tmp_path / "x.gif", GIF_MAX_FRAMES + 1)
    check_length(tmp_path / "x.mp4", GIF_MAX_FRAMES + 1)
    monkeypatch.setattr(writer_module, "has_ffmpeg", lambda: False)
    with pytest.raises(ValueError, match=r"a growing MP4 needs ffmpeg \(pip install imageio-ffmpeg\); or write a .gif"):
        check_out(tmp_path / "x.mp4")
    check_out(tmp_path / "x.gif")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.mp4"]  # the probes leave nothing
