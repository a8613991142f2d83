"""What one ``cadence serve`` process is allowed to do: its models, its device, its limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cadence import generation

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ServeSettings:
    models: tuple[str, ...] = ("ref-video",)  # reference names, or NAME=DIR / DIR for a checkpoint
    device: str = "cpu"
    dtype: str = "float32"
    data_dir: Path = field(default_factory=lambda: Path("cadence-serve"))
    api_key: str | None = None
    concurrency: int = 1  # generations running at once: one worker thread per slot, each its own pipelines
    queue_size: int = 16  # jobs waiting beyond those running; one more is answered 429
    time_limit_s: float = 600.0  # a job still running after this stops at its next step, failed
    steps: int = 20  # when a request names none
    guidance_scale: float = 4.0
    max_steps: int = 100
    max_side: int = 1280  # height and width, pixels
    max_frames: int = 129
    max_prompt_chars: int = 2000
    max_body_bytes: int = 64 * 1024  # a request body larger than this is refused with 413

    def __post_init__(self):
        if not self.models:
            raise ValueError("serve at least one model: --model ref-video, or --model NAME=DIR")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; valid: {', '.join(DTYPES)}")
        for name, low in (("concurrency", 1), ("queue_size", 0), ("max_side", 1), ("max_frames", 1),
                          ("max_prompt_chars", 1), ("max_body_bytes", 1024)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}")
        generation.check_count("max_steps", self.max_steps, generation.MAX_STEPS)
        generation.check_count("steps", self.steps, self.max_steps, why=" (max_steps)")
        generation.check_guidance_scale(self.guidance_scale)
        if not self.time_limit_s > 0:
            raise ValueError(f"time_limit_s={self.time_limit_s} must be > 0 seconds")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty: give a key, or none to serve without one")
