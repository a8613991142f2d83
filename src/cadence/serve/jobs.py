"""Job records: one JSON file per job under ``DATA_DIR/jobs/``, its outputs beside it.

Every change of a job is written atomically (a temporary file in the same directory, then
``os.replace``), so a killed process leaves either the old record or the new one, never half
of one. Records are not fsync'ed: one fsync took 12 ms on the development machine's disk, and
a job writes three records on its way from request to answer (against a goal of 50 ms of
overhead per job); what they guard against is the server process dying (a crash, an OOM kill,
a restart), after which the kernel still holds every write. A power loss may lose the last
records: a job then shows as queued, and runs again.
On start, the store reads every record back: finished jobs are kept as they are, jobs that
were running are marked failed (their generation died with the process), and queued jobs
are handed back to be queued again in the order they were submitted.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED = "queued", "in_progress", "completed", "failed", "cancelled"
STATUSES = (QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED)
FINISHED = (COMPLETED, FAILED, CANCELLED)
MEDIA_TYPES = {".mp4": "video/mp4", ".webp": "image/webp", ".gif": "image/gif", ".png": "image/png"}


@dataclass
class Job:
    """One generation request and everything that happened to it."""

    id: str
    kind: str  # "video" | "image"
    model: str
    prompt: str
    recipe: str  # as applied: the family default spelled out when the request said "default"
    steps: int
    seed: int
    guidance_scale: float
    height: int
    width: int
    frames: int | None
    compare_baseline: bool = False
    status: str = QUEUED
    progress: float = 0.0  # share of the denoising steps done, baseline run included
    step: int = 0
    total_steps: int = 0
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    completed_at: float | None = None
    timings: dict = field(default_factory=dict)  # queued_s, generation_s, baseline_s, write_s, total_s
    stats: dict = field(default_factory=dict)  # the acceleration's own (compute_fraction, ...)
    measured: dict | None = None  # what the tree measured of this recipe (catalog entry)
    fidelity: dict | None = None  # psnr_db, ssim, speedup against the baseline of the same seed
    error: str | None = None
    content: str | None = None  # file name of the output, beside the record
    baseline_content: str | None = None
    version: int = 0  # bumped on every change: the event stream sends a change once

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def public(self) -> dict:
        """The job as the API shows it (OpenAI's video object, plus cadence's fields)."""
        record = asdict(self)
        record.pop("version")
        content, baseline = record.pop("content"), record.pop("baseline_content")
        record["object"] = "video" if self.kind == "video" else "image"
        record["size"] = f"{self.width}x{self.height}"
        record["content_url"] = f"/v1/videos/{self.id}/content" if content else None
        record["baseline_url"] = f"/v1/videos/{self.id}/content?variant=baseline" if baseline else None
        record["media_type"] = MEDIA_TYPES.get(Path(content).suffix) if content else None
        return record


def new_id() -> str:
    return f"video_{uuid.uuid4().hex}"


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader (or a restart) sees the old or the new file."""
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(handle, "w") as f:
            f.write(text)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


class JobStore:
    """The jobs of this server, in memory and on disk; every method is thread-safe."""

    def __init__(self, data_dir: Path):
        self.directory = Path(data_dir) / "jobs"
        self.directory.mkdir(parents=True, exist_ok=True)
        self._jobs: dict[str, Job] = {}
        self._lock = threading.RLock()
        self.listeners: list = []  # called (from any thread) after every change of a job

    def _changed(self) -> None:
        for listener in self.listeners:
            listener()

    def path(self, job_id: str, name: str | None = None) -> Path:
        return self.directory / (name or f"{job_id}.json")

    def add(self, job: Job) -> None:
        with self._lock:
            if job.id in self._jobs:
                raise ValueError(f"job {job.id!r} exists already")
            self._jobs[job.id] = job
            self._save(job)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def all(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda job: job.created_at)

    def update(self, job: Job, **changes) -> Job:
        """Change fields of ``job`` and write its record."""
        with self._lock:
            for name, value in changes.items():
                setattr(job, name, value)
            job.version += 1
            self._save(job)
        self._changed()
        return job

    def touch(self, job: Job, **changes) -> Job:
        """Change fields that need not survive a restart (a running job's step): memory only,
        since a running job is marked failed on restart anyway."""
        with self._lock:
            for name, value in changes.items():
                setattr(job, name, value)
            job.version += 1
        self._changed()
        return job

    def _save(self, job: Job) -> None:
        write_atomically(self.path(job.id), json.dumps(asdict(job), indent=1))

    def recover(self) -> list[Job]:
        """Read every record back; mark running jobs failed; -> the queued jobs, oldest first."""
        requeue = []
        with self._lock:
            for record in sorted(self.directory.glob("*.json")):
                try:
                    job = Job(**json.loads(record.read_text()))
                except (ValueError, TypeError) as error:  # a record from another version, or damaged
                    record.rename(record.with_suffix(".unreadable"))
                    print(f"cadence serve: {record} is not a job record ({error}); moved aside")
                    continue
                self._jobs[job.id] = job
                if job.status == RUNNING:
                    self.update(job, status=FAILED, completed_at=time.time(),
                                error="the server stopped while this job ran; submit it again")
                elif job.status == QUEUED:
                    requeue.append(job)
        return sorted(requeue, key=lambda job: job.created_at)
