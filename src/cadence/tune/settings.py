"""What a tuning run is asked for: the bars, the prompts, the budget, the space; checked
before any model loads."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from cadence import generation
from cadence.tune import quality
from cadence.tune.space import SearchSpace


@dataclass
class TuneSettings:
    out: Path
    min_psnr: float = 35.0
    min_ssim: float | None = None
    min_adherence: float | None = None
    prompts: str | list[str] = "heldout"  # 'heldout' (reference models), a prompt file, or a list
    tuning_prompts: int = 4
    confirm_prompts: int = 2
    check_prompts: int = 2
    seeds: int = 2
    steps: int = 50
    guidance_scale: float = 4.0
    device: str = "cpu"
    time_budget: float = 900.0  # seconds, for everything: baselines, calibrations, search, check
    trials: int | None = None  # at most this many candidates (None: until the time budget ends)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    compile: bool | None = None  # None: searched on CUDA, left out on the CPU
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    model: str = ""  # what the report calls the model
    sampler_seed: int = 0
    command: str = ""
    # A real size (realsize.SPECS) to model each candidate's speed at, from per-step times
    # measured there; None: candidates are timed on the tuned model itself.
    speed_at: str | None = None

    def check(self) -> None:
        for name in ("min_psnr", "min_ssim", "min_adherence"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value)):
                raise ValueError(f"--{name.replace('_', '-')} {value!r} must be a finite number")
        if self.min_ssim is not None and not 0 < self.min_ssim <= 1:
            raise ValueError(f"--min-ssim {self.min_ssim} must be in (0, 1]")
        generation.check_steps(self.steps)
        generation.check_guidance_scale(self.guidance_scale)
        if not self.time_budget > 0:
            raise ValueError(f"--time-budget {self.time_budget} s must be > 0")
        if self.trials is not None:
            generation.check_count("--trials", self.trials, 10_000)
        quality.check_adherence(self.min_adherence)
        # names (and the real size, realsize.spec) checked before loading
        SearchSpace.from_registry(self.include, self.exclude, self.device, self.compile, speed_at=self.speed_at)

    def identity(self) -> dict:
        """What a study's results depend on: a resumed study must have been run with these."""
        return {"model": self.model, "min_psnr": self.min_psnr, "min_ssim": self.min_ssim,
                "min_adherence": self.min_adherence, "prompts": self.prompts if isinstance(self.prompts, str) else
                list(self.prompts), "tuning_prompts": self.tuning_prompts, "confirm_prompts": self.confirm_prompts,
                "check_prompts": self.check_prompts,
                "seeds": self.seeds, "steps": self.steps, "guidance_scale": self.guidance_scale,
                "device": self.device, "include": list(self.include), "exclude": list(self.exclude),
                "compile": self.compile, "size": [self.height, self.width, self.frames],
                # only when set: a study made before --speed-at existed resumes as it was
                **({"speed_at": self.speed_at} if self.speed_at is not None else {})}


def duration(seconds: float) -> str:
    return f"{seconds / 60:.1f}m" if seconds >= 120 else f"{seconds:.0f}s"


def parse_duration(text: str) -> float:
    """'15m', '90s', '1h' or a number of seconds -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    value = str(text).strip().lower()
    try:
        seconds = float(value[:-1]) * units[value[-1]] if value and value[-1] in units else float(value)
    except ValueError:
        raise ValueError(f"--time-budget {text!r}: expected a duration such as 15m, 90s, 1h or a number of "
                         "seconds") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"--time-budget {text!r} must be a positive duration")
    return seconds
