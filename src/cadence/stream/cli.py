"""``cadence stream`` (also ``python -m cadence.stream.cli``): a video of any length, generated
chunk by chunk with a bounded KV cache (:mod:`cadence.stream.engine`), written as it goes
(:mod:`cadence.stream.writer`), with prompt switches at given times (LongLive's KV re-cache).

Time: a reference model (pixel space) makes one video frame per latent frame, written at
``REF_FPS`` as ``cadence generate`` writes it; a Wan pipeline's causal VAE makes one video frame
of the stream's first latent frame and four of every later one, at Wan's 16 fps. ``--seconds``
becomes the fewest whole chunks that make that many video frames, and the video is cut to
exactly ``ceil(seconds x fps)`` frames. A switch at T seconds takes effect at the first chunk
that starts at or after T.

The recipe's ``sequence`` terms (kv-*) are the stream's KV cache (kv-sink-window(sink=3,
frames=12) when it names no policy); every term is applied with ``cadence.accelerate`` before
anything is generated, so a term the stream cannot take is refused first. Step-level terms are
refused: they reuse a forward across the denoising steps of one pipeline call and would skip the
cache's write pass.

Every bad request is refused before the first chunk, with the bad value and the valid ones.
Ctrl-C, or a killed process, leaves a playable file of every chunk written before it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import click

from cadence.cli import _check_model, _device, _quiet

REF_FPS = 8  # write_video's default: the rate `cadence generate` writes ref-video at
WAN_FPS = 16  # Wan2.1's training frame rate
MIN_SIDE = 128  # small frames are upscaled by whole pixels to at least this (ref-video's 32 -> 128, as generate's 4x)
NOT_A_STUDENT = (
    "note: {model} is a bidirectional model run causally, chunk by chunk: it drifts over a stream; "
    "no trained stream student exists yet (issue 18's ref-stream)"
)


@dataclass(frozen=True)
class Timing:
    """How a stream's latent frames become video frames and seconds."""

    fps: float
    temporal: int  # video frames of every latent frame after the first (pixel space: 1, Wan's VAE: 4)
    frames_per_chunk: int

    def video_frames(self, chunks: int) -> int:
        """Video frames the first ``chunks`` chunks make: the first latent frame gives one."""
        latent = chunks * self.frames_per_chunk
        return 0 if latent == 0 else 1 + self.temporal * (latent - 1)

    def start(self, chunk: int) -> float:
        """Seconds into the video at which ``chunk`` starts."""
        return self.video_frames(chunk) / self.fps

    def frames(self, seconds: float) -> int:
        """Video frames in ``seconds`` (a partial frame counts)."""
        return math.ceil(seconds * self.fps - 1e-9)

    def _chunks_reaching(self, video_frames: float) -> int:
        """The fewest chunks (at least one) making ``video_frames``: 1 + temporal x (latent - 1) >= video_frames."""
        latent = 1 + (video_frames - 1) / self.temporal
        return max(1, math.ceil(latent / self.frames_per_chunk - 1e-9))

    def chunks(self, seconds: float) -> int:
        """The fewest chunks that make ``seconds`` of video."""
        return self._chunks_reaching(self.frames(seconds))

    def switch_chunk(self, at: float) -> int:
        """The first chunk after the first that starts at or after ``at`` seconds: chunk k starts
        after the video frames of chunks 0..k-1."""
        return self._chunks_reaching(at * self.fps)


def parse_switches(values: tuple[str, ...], seconds: float) -> list[tuple[float, str]]:
    """``--switch T:PROMPT`` values as (seconds, prompt), refused unless each time is inside the
    stream and later than the one before."""
    switches: list[tuple[float, str]] = []
    for value in values:
        at, colon, prompt = value.partition(":")
        try:
            time_at = float(at) if colon else math.nan
        except ValueError:
            time_at = math.nan
        if not math.isfinite(time_at) or not prompt.strip():
            raise ValueError(f"--switch {value!r}; valid: SECONDS:PROMPT, e.g. --switch '30:a blue circle moves up'")
        if not 0 < time_at < seconds:
            where = "past the end of" if time_at >= seconds else "before the start of"
            raise ValueError(
                f"--switch {value!r}: {time_at:g} s is {where} the {seconds:g} s stream; valid: a time "
                f"in (0, {seconds:g}) seconds"
            )
        if switches and time_at <= switches[-1][0]:
            raise ValueError(
                f"--switch {value!r}: {time_at:g} s does not come after the switch at "
                f"{switches[-1][0]:g} s; valid: switch times in increasing order"
            )
        switches.append((time_at, prompt.strip()))
    return switches


def _timing(pipe, frames_per_chunk: int) -> Timing:
    from cadence import generation

    if not generation.is_video(pipe):
        raise ValueError(
            f"{type(pipe).__name__} makes images; a stream takes a video model: ref-video, ref-video-hd "
            "or a Wan checkpoint"
        )
    if getattr(pipe, "vae", None) is None:
        return Timing(REF_FPS, 1, frames_per_chunk)
    return Timing(WAN_FPS, int(pipe.vae_scale_factor_temporal), frames_per_chunk)


def _schedule(switches: list[tuple[float, str]], timing: Timing, chunks: int) -> dict[int, str]:
    """{chunk: prompt}, refused where a switch has no chunk left to start or two share one."""
    schedule: dict[int, str] = {}
    last = timing.start(chunks - 1)
    for at, prompt in switches:
        chunk = timing.switch_chunk(at)
        if chunk >= chunks:
            raise ValueError(
                f"--switch at {at:g} s: the stream's last chunk starts at {last:g} s, so no chunk is "
                f"left to take the new prompt; valid: a time in (0, {last:g}] seconds"
            )
        if chunk in schedule:
            raise ValueError(
                f"--switch at {at:g} s falls in the same chunk ({chunk}, from {timing.start(chunk):g} s) "
                f"as the switch before it; valid: switches at least one chunk "
                f"({timing.start(chunks) - timing.start(chunks - 1):g} s) apart"
            )
        schedule[chunk] = prompt
    return schedule


def _embeddings(pipe, prompt: str, device):
    """(1, tokens, text_dim) text embeddings, as the pipeline conditions its transformer."""
    from cadence.reference.pipelines import _RefPipeline

    if isinstance(pipe, _RefPipeline):
        pipe.check_captions([prompt])
        return pipe.encode_prompt([prompt])[0]
    embeds, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, device=device)
    return embeds


def _stream_recipe(text: str | None, student: dict | None = None):
    """The recipe to apply: the given one, refused if it holds step-level terms, with the default
    KV policy added where it names none: for a causal stream student (``student``: its
    ``chunk_frames`` and training ``frames``), a sink of one chunk and a window that keeps the kept
    frames plus one chunk within the frame positions it was trained on."""
    from cadence.accel.sequence import KVPolicyConfig
    from cadence.recipe import Recipe
    from cadence.stream import DEFAULT_POLICY

    recipe = Recipe.parse(text) if text is not None else Recipe()
    step = [str(term) for term in recipe.techniques if term.level == "step"]
    if step:
        raise ValueError(
            f"--recipe: step-level terms ({', '.join(step)}) reuse a forward across the steps of one pipeline call, "
            "which would skip the stream's cache writes; valid in a stream: the graph, bit, token and sequence levels "
            "(`cadence recipes` lists them)"
        )
    if not any(isinstance(term, KVPolicyConfig) for term in recipe.techniques):
        recipe = Recipe([*recipe.techniques, _student_policy(student) if student else DEFAULT_POLICY])
    return recipe


def _student_policy(student: dict):
    """kv-sink-window for a causal student: sink = one chunk, window = the rest of its training
    clip less the chunk being made (ref-stream: chunks of 4 in 16 frames -> sink 4 + window 8)."""
    from cadence.accel.sequence.policies import SinkWindowConfig

    chunk, frames = student["chunk_frames"], student["frames"]
    return SinkWindowConfig(sink=chunk, frames=max(chunk, frames - 2 * chunk))


def _pixels(frames, scale: int):
    """(T, 3, H, W) in [-1, 1] -> (T, H * scale, W * scale, 3) uint8."""
    import torch

    video = ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    if scale > 1:
        video = video.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    return video.cpu().numpy()


@click.command("stream")
@click.option(
    "--model",
    default="ref-video",
    show_default=True,
    help="ref-video, ref-video-hd, or a local Wan checkpoint directory",
)
@click.option("--prompt", required=True, help="the caption the stream starts with")
@click.option("--seconds", type=float, default=10, show_default=True, help="length of the video")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default="stream.mp4",
    show_default=True,
    help="a .mp4 (fragmented: playable while it grows) or a .gif (short streams, without ffmpeg)",
)
@click.option(
    "--recipe",
    default=None,
    help="e.g. 'kv-sink-window(sink=3, frames=12) + kv-format(format=int8) + compile'; default: "
    "kv-sink-window(sink=3, frames=12)",
)
@click.option(
    "--switch",
    "switches",
    multiple=True,
    metavar="SECONDS:PROMPT",
    help="switch to a new prompt at a time (repeatable, in increasing order)",
)
@click.option(
    "--switch-recache/--no-switch-recache",
    default=True,
    show_default=True,
    help="at a switch, re-encode the cached frames with the new prompt (LongLive's KV re-cache)",
)
@click.option(
    "--frames-per-chunk",
    type=click.IntRange(min=1),
    default=None,
    help="latent frames per chunk [default: a stream student's own (ref-stream: 4), else 3]",
)
@click.option(
    "--steps-per-chunk", type=click.IntRange(min=1), default=4, show_default=True, help="denoising steps per chunk"
)
@click.option("--height", type=int, default=None, help="in pixels; default: the checkpoint's own")
@click.option("--width", type=int, default=None, help="in pixels; default: the checkpoint's own")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None, callback=_device, help="cpu or cuda (default: cuda when available)")
@click.pass_context
def stream(
    ctx,
    model,
    prompt,
    seconds,
    out,
    recipe,
    switches,
    switch_recache,
    frames_per_chunk,
    steps_per_chunk,
    height,
    width,
    seed,
    device,
):
    """Generate a video of --seconds chunk by chunk with a bounded KV cache, writing it as it goes."""
    _quiet()
    import cadence
    from cadence import generation
    from cadence.stream import stream as generate_stream
    from cadence.stream.writer import check_length, check_out

    acceleration = None
    try:
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"--seconds {seconds:g}; valid: a positive number of seconds of video")
        timed = parse_switches(switches, seconds)
        generation.check_seed(seed)
        check_out(out)
        parsed = _stream_recipe(recipe)  # refused before the model loads
        _check_model(model)
        pipe = cadence.load(model, device=device)
        student = getattr(pipe, "student", None) or {}
        trained_chunk = student.get("chunk_frames")  # a causal stream student's
        if trained_chunk is not None:
            parsed = _stream_recipe(recipe, student)
            if steps_per_chunk != student["steps"]:
                click.echo(f"note: {model} was trained at {student['steps']} steps a chunk; at {steps_per_chunk} "
                           "it runs at the scheduler's own sigmas, which it never saw", err=True)
        frames_per_chunk = frames_per_chunk or trained_chunk or 3
        timing = _timing(pipe, frames_per_chunk)
        check_length(out, timing.frames(seconds))
        size = generation.resolve_size(pipe, height, width, 1)
        chunks = timing.chunks(seconds)
        schedule = _schedule(timed, timing, chunks)
        embeds = _embeddings(pipe, prompt, device)
        prompts = {chunk: _embeddings(pipe, text, device) for chunk, text in schedule.items()}
        spatial = pipe.vae_scale_factor_spatial if getattr(pipe, "vae", None) is not None else 1
        acceleration = cadence.accelerate(pipe, parsed)
        chunk_stream = generate_stream(
            pipe,
            embeds,
            chunks=chunks,
            frames_per_chunk=frames_per_chunk,
            steps_per_chunk=steps_per_chunk,
            height=size.height // spatial,
            width=size.width // spatial,
            seed=seed,
            prompts=prompts,
            recache=switch_recache,
        )
    except (ValueError, TypeError, FileNotFoundError) as error:
        if acceleration is not None:
            acceleration.remove()
        raise click.ClickException(str(error)) from None
    if trained_chunk is None:
        click.echo(NOT_A_STUDENT.format(model=model), err=True)
    _run(
        ctx,
        chunk_stream,
        acceleration,
        out,
        timing,
        timing.frames(seconds),
        max(1, math.ceil(MIN_SIDE / min(size.height, size.width))),
        chunks,
    )


def _run(ctx, chunk_stream, acceleration, out: Path, timing: Timing, wanted: int, scale: int, chunks: int) -> None:
    """Write the chunks as they come, with the progress line; the last line sums up, also after Ctrl-C."""
    from tqdm import tqdm

    from cadence.stream.writer import WriterError, open_writer

    summary, interrupted = _Summary(timing.fps), False
    try:
        with open_writer(out, timing.fps) as writer, tqdm(total=chunks, unit="chunk", desc="stream") as progress:
            for chunk in chunk_stream:
                video = chunk.frames[0][: wanted - writer.frames]  # (T, 3, H, W); the last chunk cut at --seconds
                writer.write(_pixels(video, scale))
                summary.add(chunk, len(video))
                progress.set_postfix_str(summary.progress(), refresh=False)
                progress.update()
                if chunk.recached_frames:
                    progress.write(f"chunk {chunk.index}: new prompt; re-cached {len(chunk.recached_frames)} frames")
    except KeyboardInterrupt:
        interrupted = True
    except WriterError as error:  # ffmpeg stopped (a full disk, killed)
        raise click.ClickException(str(error)) from None
    finally:
        chunk_stream.close()  # the KV cache's memory goes with the stream
        acceleration.remove()  # the model as it was loaded
    wrote = f"wrote {out}" if summary.frames else "nothing written"
    click.echo(
        f"{'interrupted: ' if interrupted else ''}{summary.line()}; {acceleration.recipe.spelled_out()}; {wrote}"
    )
    if interrupted:
        ctx.exit(130)


class _Summary:
    """What the progress line and the last line say."""

    def __init__(self, fps: float):
        self.fps, self.began = fps, time.perf_counter()
        self.frames, self.first, self.peak_kv, self.kept = 0, None, 0, 0
        self.kv = 0

    def add(self, chunk, frames: int) -> None:
        self.frames += frames
        self.first = self.first if self.first is not None else time.perf_counter() - self.began
        self.kv, self.kept = chunk.kv_bytes, len(chunk.kept_frames)
        self.peak_kv = max(self.peak_kv, chunk.kv_bytes)

    def rate(self) -> float:
        return self.frames / max(time.perf_counter() - self.began, 1e-9)

    def progress(self) -> str:
        return (
            f"{self.frames / self.fps:.1f} s video, {self.rate():.1f} frames/s, KV {self.kv / 2**20:.3g} MiB, "
            f"{self.kept} latent frames kept"
        )

    def line(self) -> str:
        first = "no chunk" if self.first is None else f"first chunk in {self.first:.2f} s"
        return (
            f"{self.frames} frames ({self.frames / self.fps:.2f} s of video at {self.fps:g} fps) in "
            f"{time.perf_counter() - self.began:.1f} s: {self.rate():.1f} frames/s, {first}, peak KV "
            f"{self.peak_kv / 2**20:.3g} MiB"
        )


if __name__ == "__main__":
    stream()
