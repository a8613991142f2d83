"""The worker: a bounded queue and one thread per device slot, each with its own loaded
pipelines (pipelines.py), running one job at a time.

A running job is watched through the pipeline's progress bar: every diffusers pipeline (and
cadence's reference ones) calls ``progress_bar.update()`` once per denoising step, so the
worker lends each generation a progress bar of its own that records the step and raises at
a step boundary when the job was cancelled or ran past its time limit. A step already
running finishes first: a job stops at its next step, never inside a forward.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from pathlib import Path

import torch

from cadence import generation
from cadence.bench import metrics
from cadence.bench.report import write_video
from cadence.recipe import accelerate
from cadence.serve.jobs import (
    CANCELLED,
    COMPLETED,
    FAILED,
    QUEUED,
    RUNNING,
    Job,
    JobStore,
)
from cadence.serve.pipelines import ServedModel
from cadence.serve.settings import ServeSettings


class QueueFull(Exception):
    def __init__(self, capacity: int, retry_after: int):
        super().__init__(f"the queue is full ({capacity} jobs waiting); retry in about {retry_after} s")
        self.retry_after = retry_after


class Stopped(Exception):
    """Raised at a step boundary to stop a generation; the message says why."""


class JobQueue:
    """FIFO of waiting jobs with a capacity; a cancelled job leaves it at once."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._jobs: deque[Job] = deque()
        self._ready = threading.Condition()

    def put(self, job: Job, force: bool = False) -> None:
        with self._ready:
            if len(self._jobs) >= self.capacity and not force:
                raise QueueFull(self.capacity, 1)
            self._jobs.append(job)
            self._ready.notify()

    def remove(self, job: Job) -> bool:
        with self._ready:
            if job in self._jobs:
                self._jobs.remove(job)
                return True
            return False

    def get(self, timeout: float) -> Job | None:
        with self._ready:
            if not self._jobs:
                self._ready.wait(timeout)
            return self._jobs.popleft() if self._jobs else None

    def wake_all(self) -> None:
        with self._ready:
            self._ready.notify_all()

    def __len__(self) -> int:
        return len(self._jobs)


class _StepWatch:
    """Stands in for a pipeline's tqdm bar (``pipe.progress_bar(total=...)`` or
    ``pipe.progress_bar(iterable)``): ``on_step`` runs after every denoising step."""

    def __init__(self, on_step):
        self.on_step = on_step

    def __call__(self, iterable=None, total=None):
        if iterable is not None:
            return self._each(iterable)
        return self

    def _each(self, iterable):
        for item in iterable:
            yield item
            self.on_step()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1):
        self.on_step()


def _ffmpeg() -> bool:
    import importlib.util

    return importlib.util.find_spec("imageio_ffmpeg") is not None


def _write_webp(path: Path, frames: torch.Tensor, fps: float = 8) -> Path:
    """A looping animated WebP: what an <img> plays where no ffmpeg writes MP4. Not a GIF:
    PIL wrote 81 frames of 480 x 832 as GIF in 8.7 s (smooth content) to 153 s (noise, what
    random weights make) on a loaded 2-core CPU, as WebP in 0.7 s to 7.5 s."""
    import numpy as np
    from PIL import Image

    # in numpy: torch's thread pool took 110 ms for this on a 32 x 32 clip on a loaded CPU
    pixels = np.clip((frames.numpy() + 1) * 127.5, 0, 255).round().astype(np.uint8).transpose(0, 2, 3, 1)  # (T, H, W, 3)
    images = [Image.fromarray(frame) for frame in pixels]
    # The reference models' 32 x 32 clips are shown upscaled, where lossy artifacts show; at
    # that size lossless costs little.
    lossless = pixels.shape[1] * pixels.shape[2] <= 128 * 128
    images[0].save(path, format="WEBP", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0,
                   quality=85, method=0, lossless=lossless)  # method 0: the fastest encoder setting
    return path


def _write(directory: Path, stem: str, pixels: torch.Tensor, image: bool) -> str:
    """Write pixels under a temporary name and rename: a reader never sees half a file. At the
    pixels' own size: the page scales small outputs up."""
    frames = pixels[None] if image else pixels  # (T, 3, H, W)
    if image:
        written = write_video(directory / f".{stem}.partial.png", frames, scale=1)
    elif _ffmpeg():  # an MP4 ffmpeg fails to write falls back to a GIF
        written = write_video(directory / f".{stem}.partial.mp4", frames, scale=1)
    else:
        written = _write_webp(directory / f".{stem}.partial.webp", frames)
    final = directory / f"{stem}{written.suffix}"
    os.replace(written, final)
    return final.name


class Worker:
    def __init__(self, settings: ServeSettings, models: dict[str, ServedModel], store: JobStore):
        self.settings, self.models, self.store = settings, models, store
        self.queue = JobQueue(settings.queue_size)
        self.running: dict[str, Job] = {}
        self._stop_reasons: dict[str, str] = {}  # job id -> why it must stop at its next step
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._serve_slot, args=(slot,), name=f"cadence-slot-{slot}",
                                          daemon=True) for slot in range(settings.concurrency)]
        # for /metrics and the retry hint
        self.finished = {COMPLETED: 0, FAILED: 0, CANCELLED: 0}
        self.rejected = 0
        self.run_seconds = [0.0, 0]  # sum, count: wall time of a job's run (generations and writing)
        self.wait_seconds = [0.0, 0]  # sum, count: time in the queue

    # -- the API's side ------------------------------------------------------------------
    def start(self, recovered: list[Job] = ()) -> None:
        for job in recovered:  # queued before a restart: queued again, even beyond capacity
            self.queue.put(job, force=True)
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the running jobs at their next step (marked failed); queued ones stay queued
        on disk and run after a restart."""
        self._stopping.set()
        with self._lock:
            for job_id in self.running:
                self._stop_reasons.setdefault(job_id, "the server stopped while this job ran; submit it again")
        self.queue.wake_all()
        for thread in self._threads:
            thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self._lock:  # only submit adds to the queue: it cannot fill between the check and the put
            if len(self.queue) >= self.queue.capacity:
                self.rejected += 1
                raise QueueFull(self.queue.capacity, self.retry_after())
            self.store.add(job)  # on disk before a slot can take it
            self.queue.put(job)

    def retry_after(self) -> int:
        """Seconds until a place in the queue is likely free: the mean run time of a job."""
        total, count = self.run_seconds
        return max(1, math.ceil(total / count)) if count else 1

    def cancel(self, job: Job) -> Job:
        """Drop a queued job; ask a running one to stop at its next step."""
        with self._lock:
            if job.status == QUEUED and self.queue.remove(job):
                self.finished[CANCELLED] += 1
                return self.store.update(job, status=CANCELLED, completed_at=time.time(), error="cancelled while queued")
            if job.status in (QUEUED, RUNNING):  # queued: a slot took it a moment ago
                self._stop_reasons.setdefault(job.id, "cancelled")
        return job

    # -- the slot's side -----------------------------------------------------------------
    def _serve_slot(self, slot: int) -> None:
        while not self._stopping.is_set():
            job = self.queue.get(timeout=0.5)
            if job is not None:
                self._run(job, slot)

    def _run(self, job: Job, slot: int) -> None:
        started = time.time()
        pipe = self.models[job.model].pipes[slot]
        runs = 2 if job.compare_baseline else 1
        with self._lock:
            self.running[job.id] = job
            self.store.update(job, status=RUNNING, started_at=started, total_steps=job.steps * runs,
                              timings={"queued_s": started - job.created_at})
        timings = dict(job.timings)
        try:
            baseline = None
            if job.compare_baseline:
                baseline, timings["baseline_s"], _ = self._generate(job, pipe, "baseline", started)
            output, timings["generation_s"], stats = self._generate(job, pipe, job.recipe, started)
            begin = time.perf_counter()
            image = job.kind == "image"
            changes = {"content": _write(self.store.directory, job.id, output, image), "stats": _plain(stats)}
            if baseline is not None:
                changes["baseline_content"] = _write(self.store.directory, f"{job.id}-baseline", baseline, image)
                changes["fidelity"] = {"psnr_db": _finite(metrics.psnr(output, baseline)),
                                       "ssim": metrics.ssim(output, baseline),
                                       "speedup": timings["baseline_s"] / timings["generation_s"]}
            timings["write_s"] = time.perf_counter() - begin
            status, error = COMPLETED, None
        except Stopped as stop:
            status, error, changes = (CANCELLED if str(stop) == "cancelled" else FAILED), str(stop), {}
        except Exception as failure:  # noqa: BLE001 - one job's failure (a recipe that does not fit, NaN latents) must not end the slot
            status, error, changes = FAILED, f"{type(failure).__name__}: {failure}", {}
        finished = time.time()
        timings["total_s"] = finished - job.created_at
        with self._lock:
            self.running.pop(job.id, None)
            self._stop_reasons.pop(job.id, None)
            self.finished[status] += 1
            self.run_seconds[0] += finished - started
            self.run_seconds[1] += 1
            self.wait_seconds[0] += timings["queued_s"]
            self.wait_seconds[1] += 1
            self.store.update(job, status=status, error=error, completed_at=finished, timings=timings,
                              progress=1.0 if status == COMPLETED else job.progress, **changes)

    def _generate(self, job: Job, pipe, recipe: str, started: float):
        """One generation of ``job`` with ``recipe`` -> (pixels, seconds, acceleration stats)."""
        done_before = job.step

        def on_step():
            step = min(job.step + 1, job.total_steps)
            self.store.touch(job, step=step, progress=step / job.total_steps)
            reason = self._stop_reasons.get(job.id)
            if reason is None and time.time() - started > self.settings.time_limit_s:
                reason = (f"over this server's time limit of {self.settings.time_limit_s:g} s: stopped after step "
                          f"{step - done_before} of {job.steps}")
            if reason is not None:
                raise Stopped(reason)

        pipe.progress_bar = _StepWatch(on_step)  # an instance attribute hides the pipeline's method
        size = generation.Size(job.height, job.width, job.frames)
        try:
            with accelerate(pipe, recipe) as acceleration:
                begin = time.perf_counter()
                pixels = generation.generate(pipe, job.prompt, steps=job.steps, seed=job.seed,
                                             guidance_scale=job.guidance_scale, size=size)
                seconds = time.perf_counter() - begin
                stats = acceleration.stats()
        finally:
            pipe.__dict__.pop("progress_bar", None)
        return pixels, seconds, stats


def _finite(value: float) -> float | None:
    """JSON has no infinity: identical outputs give a PSNR of None (and SSIM 1)."""
    return value if math.isfinite(value) else None


def _plain(stats: dict) -> dict:
    """Acceleration stats as JSON can hold them (tensors and odd types as text)."""
    import json

    try:
        return json.loads(json.dumps(stats, default=str))
    except (TypeError, ValueError):
        return {key: str(value) for key, value in stats.items()}
