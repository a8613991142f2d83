"""``cadence stream`` end to end on tiny models: a Wan checkpoint's stream written as a growing
MP4 that ffmpeg reads frame for frame, a reference model's at its own frame rate as a GIF, Ctrl-C
leaving a playable file of the chunks done and the model restored, and every bad request refused
in one line before the first chunk, with nothing written."""

import pytest
import torch
from click.testing import CliRunner
from conftest import TEXT_DIM, text, tiny_wan
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

import cadence
import cadence.stream
from cadence.accel.sequence._base import KV_CACHE
from cadence.reference.pipelines import RefVideoPipeline
from cadence.stream.cli import Timing, stream

WAN = ["--height", "16", "--width", "16", "--seconds", "2", "--steps-per-chunk", "1"]  # 3 chunks, 32 frames at 16 fps
CAPTION = "a small red square moves left over a blue gradient"
SWITCHED = "a large white triangle stays still over an orange checkerboard"


@pytest.fixture
def loaded(monkeypatch):
    """The pipelines the command loads, to look at after it ran."""
    pipes, load = [], cadence.load

    def recording(*args, **kwargs):
        pipes.append(load(*args, **kwargs))
        return pipes[-1]

    monkeypatch.setattr(cadence, "load", recording)
    return pipes


@pytest.fixture
def ref_video(monkeypatch, loaded):
    """--model ref-video answered by a tiny RefVideoPipeline (8 x 8 pixels) whose captions' embeddings
    are precomputed, as a machine without the text encoder runs them."""

    def load(name, device=None, **_):
        pipe = RefVideoPipeline(
            transformer=tiny_wan(),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            sample_size={"frames": 4, "height": 8, "width": 8},
        )
        pipe.prompt_cache = {
            caption: (text(seed=seed), torch.zeros(1, TEXT_DIM)) for seed, caption in enumerate((CAPTION, SWITCHED))
        }
        loaded.append(pipe)
        return pipe

    monkeypatch.setattr(cadence, "load", load)
    return loaded


def invoke(*args):
    return CliRunner().invoke(stream, [*map(str, args), "--device", "cpu"])


def _restored(pipes) -> bool:
    return all(
        not hasattr(pipe.transformer, KV_CACHE)
        and all(type(block.attn1.processor).__module__.startswith("diffusers.") for block in pipe.transformer.blocks)
        for pipe in pipes
    )


def test_timing_turns_seconds_into_whole_chunks_and_switch_times_into_chunks():
    wan, ref = Timing(16, 4, 3), Timing(8, 1, 3)
    assert [wan.video_frames(c) for c in range(4)] == [0, 9, 21, 33]  # 1 + 4 (latent frames - 1)
    assert wan.chunks(2) == 3 and wan.frames(2) == 32 and wan.start(2) == 21 / 16
    assert ref.chunks(1.5) == 4 and ref.frames(1.5) == 12 and ref.chunks(1.6) == 5
    assert [wan.switch_chunk(t) for t in (0.1, 0.5625, 0.6, 1.3125, 1.32)] == [1, 1, 2, 2, 3]
    assert [ref.switch_chunk(t) for t in (0.1, 0.375, 0.4, 0.75)] == [1, 1, 2, 2]
    for timing in (wan, ref, Timing(16, 4, 1)):  # the closed forms are the fewest chunks, by counting
        for seconds in (0.01, 0.5, 1, 2.3, 7):
            assert timing.video_frames(timing.chunks(seconds)) >= timing.frames(seconds)
            assert timing.chunks(seconds) == 1 or timing.video_frames(timing.chunks(seconds) - 1) < timing.frames(
                seconds
            )
            switch = timing.switch_chunk(seconds)
            assert timing.start(switch) >= seconds and (switch == 1 or timing.start(switch - 1) < seconds)
    assert Timing(16, 4, 3).chunks(3600) == 4801  # an hour: 57,600 frames need 14,401 latent frames, 4,801 chunks of 3


def test_a_wan_stream_is_a_growing_mp4_that_ffmpeg_reads_frame_for_frame(
    checkpoint_dirs, tmp_path, loaded, decoded_frames
):
    out = tmp_path / "stream.mp4"
    recipe = "kv-window(frames=6) + kv-format(format=int8)"
    result = invoke(
        *("--model", checkpoint_dirs("wan"), "--prompt", "a red cube", "--height", 16, "--width", 16),
        *("--seconds", 1, "--steps-per-chunk", 1, "--out", out, "--recipe", recipe, "--switch", "0.5:a blue ball"),
    )
    assert result.exit_code == 0, result.output
    assert decoded_frames(out) == 16  # 1 + 8 frames, then 12, cut at 1 s
    assert result.output.count("note: ") == 1 and "bidirectional model run causally" in result.output
    assert "chunk 1: new prompt; re-cached 3 frames" in result.output  # the switch at 0.5 s: chunk 1, from 0.5625 s
    last = result.output.strip().splitlines()[-1]
    summary = ("16 frames (1.00 s of video at 16 fps)", "frames/s", "first chunk in", "peak KV", f"wrote {out}")
    for fragment in (*summary, "kv-window(frames=6) + kv-format(format='int8')"):
        assert fragment in last, last
    assert "latent frames kept" in result.output and "MiB" in result.output  # the progress line
    assert _restored(loaded)


def test_a_reference_model_streams_at_its_own_frame_rate(ref_video, tmp_path):
    out = tmp_path / "stream.gif"
    result = invoke(
        "--prompt",
        CAPTION,
        "--seconds",
        "1.5",
        "--steps-per-chunk",
        "1",
        "--out",
        out,
        "--switch",
        f"0.5:{SWITCHED}",
        "--no-switch-recache",
    )
    assert result.exit_code == 0, result.output
    assert "12 frames (1.50 s of video at 8 fps)" in result.output and "re-cached" not in result.output
    with Image.open(out) as gif:
        assert gif.size == (128, 128) and gif.n_frames == 12  # 8 x 8 pixels upscaled 16x; 4 chunks of 3 frames
    assert _restored(ref_video)


def test_ctrl_c_leaves_a_playable_file_of_the_chunks_done(ref_video, tmp_path, monkeypatch, decoded_frames):
    real = cadence.stream.stream

    def interrupted(*args, **kwargs):
        chunks = real(*args, **kwargs)

        def two_then_ctrl_c():
            yield next(chunks)
            yield next(chunks)
            raise KeyboardInterrupt  # as Ctrl-C in the middle of the third chunk

        return two_then_ctrl_c()

    monkeypatch.setattr(cadence.stream, "stream", interrupted)
    out = tmp_path / "stream.mp4"
    result = invoke("--prompt", CAPTION, "--seconds", 3, "--steps-per-chunk", 1, "--out", out)
    assert result.exit_code == 130, result.output
    assert "interrupted: 6 frames" in result.output and f"wrote {out}" in result.output
    assert decoded_frames(out) == 6  # the two chunks finished, of 3 frames each
    assert _restored(ref_video)


REFUSED = {
    "no seconds": (["--seconds", "0"], ["--seconds 0; valid: a positive number of seconds of video"]),
    "negative seconds": (["--seconds", "-2.5"], ["--seconds -2.5; valid: a positive number"]),
    "a switch past the end": (
        ["--switch", "3:a blue ball"],
        ["'3:a blue ball': 3 s is past the end of the 2 s stream; valid: a time in (0, 2) seconds"],
    ),
    "switches not increasing": (
        ["--switch", "1:a", "--switch", "0.5:b"],
        ["0.5 s does not come after the switch at 1 s; valid: switch times in increasing order"],
    ),
    "a switch without a time": (
        ["--switch", "soon:a blue ball"],
        ["--switch 'soon:a blue ball'; valid: SECONDS:PROMPT"],
    ),
    "a switch in the last chunk": (
        ["--switch", "1.5:a blue ball"],
        ["the stream's last chunk starts at 1.3125 s", "valid: a time in (0, 1.3125] seconds"],
    ),
    "two switches in one chunk": (
        ["--switch", "0.6:a", "--switch", "0.9:b"],
        ["0.9 s falls in the same chunk (2, from 1.3125 s)", "at least one chunk (0.75 s) apart"],
    ),
    "a window shorter than a chunk": (
        ["--recipe", "kv-window(frames=2)"],
        ["frames=2 is shorter than one chunk (frames_per_chunk=3)", "valid: frames >= 3"],
    ),
    "an unknown kv format": (
        ["--recipe", "kv-format(format=int2)"],
        ["kv-format: format='int2'; valid: native, bf16, int8, fp8, int4, int4-g64"],
    ),
    "an attention term beside the cache": (["--recipe", "sparse-window"], ["already has a cadence technique"]),
    "a step-level term": (
        ["--recipe", "fixed-interval(interval=2)"],
        ["step-level terms (fixed-interval) reuse a forward", "the graph, bit, token and sequence levels"],
    ),
    "a missing folder": (
        ["--out", "{tmp}/missing/stream.mp4"],
        ["missing' is not an existing folder; valid: a file in"],
    ),
    "a format it does not write": (["--out", "{tmp}/stream.avi"], ["a stream is written as .mp4 or .gif, not '.avi'"]),
    "no frames per chunk": (["--frames-per-chunk", "0"], ["'--frames-per-chunk': 0 is not in the range x>=1"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_requests_are_refused_before_the_first_chunk(case, checkpoint_dirs, tmp_path, loaded):
    args, fragments = REFUSED[case]
    args = [arg.format(tmp=tmp_path) for arg in args]
    out = ["--out", tmp_path / "stream.mp4"] if "--out" not in args else []
    result = invoke("--model", checkpoint_dirs("wan"), "--prompt", "a red cube", *WAN, *out, *args)
    _refused(result, fragments)
    assert not any(tmp_path.rglob("*.*")), list(tmp_path.rglob("*"))  # nothing written
    assert _restored(loaded)


def _refused(result, fragments) -> None:
    assert result.exit_code not in (0, 130) and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} missing from {errors[0]!r}"
    assert "chunk/s" not in result.output  # no progress line: nothing was generated


def test_a_folder_it_cannot_write_in_is_refused(ref_video):
    try:  # chmod does not stop root: a read-only file system does (sysfs, read-only in containers)
        open("/sys/.cadence-probe", "w").close()
    except OSError:
        pass
    else:
        pytest.skip("/sys is writable here")
    _refused(invoke("--prompt", CAPTION, "--out", "/sys/stream.gif"), ["the folder '/sys' is not writable"])


def test_a_caption_outside_the_reference_world_is_refused(ref_video, tmp_path):
    out = tmp_path / "stream.gif"
    result = invoke("--prompt", CAPTION, "--seconds", "2", "--switch", "1:a red cube", "--out", out)
    _refused(result, ["unknown words 'cube'", "`cadence prompts` prints the grammar"])
    assert not out.exists() and _restored(ref_video)


def test_an_image_model_is_refused(checkpoint_dirs, tmp_path):
    result = invoke("--model", checkpoint_dirs("flux"), "--prompt", "a red cube", "--out", tmp_path / "stream.gif")
    _refused(result, ["FluxPipeline makes images; a stream takes a video model"])


def test_a_causal_students_default_policy_stays_within_the_positions_it_was_trained_on():
    from cadence.accel.sequence.policies import SinkWindowConfig
    from cadence.stream.cli import _stream_recipe

    student = {"chunk_frames": 4, "frames": 16, "steps": 4}
    (policy,) = [t for t in _stream_recipe(None, student).techniques if isinstance(t, SinkWindowConfig)]
    assert (policy.sink, policy.frames) == (4, 8) and policy.sink + policy.frames + 4 <= 16
    given = _stream_recipe("kv-window(frames=6)", student)
    assert [str(t) for t in given.techniques] == ["kv-window(frames=6)"]  # the user's policy is kept
    assert cadence.stream.DEFAULT_POLICY in _stream_recipe(None).techniques  # any other model: LongLive's
