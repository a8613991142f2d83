"""What the stream's writer and command tests share: counting the frames ffmpeg decodes."""

import subprocess

import pytest

from cadence.stream.writer import has_ffmpeg


def _decoded_frames(path) -> int:
    """Frames ffmpeg decodes from the file (-1 when it cannot open it)."""
    import imageio_ffmpeg

    result = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-map", "0:v:0", "-f", "framemd5", "-"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    if result.returncode:
        return -1
    return sum(1 for line in result.stdout.splitlines() if line and not line.startswith("#"))


@pytest.fixture
def decoded_frames():
    """ffmpeg's frame count of a file; the test skips where imageio-ffmpeg is not installed."""
    if not has_ffmpeg():
        pytest.skip("imageio-ffmpeg is not installed: no MP4 is written")
    return _decoded_frames
