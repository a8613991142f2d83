"""Running candidates on the user's pipeline: baselines, timed generations, quality, and
the calibrations a candidate needs, made on the fly.

Baseline outputs are cached under ``OUT/baselines`` (keyed by everything that decides them),
so a resumed study does not generate them again. A generation of a candidate that has run
longer than it may (``deadline``) is stopped at its next transformer forward: it cannot win,
and on a CPU one slow candidate (a masked-dense sparse pattern) costs minutes.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cadence import generation
from cadence.accel.registry import get_technique
from cadence.bench import metrics
from cadence.bench.runner import timed
from cadence.recipe import Recipe, accelerate

# What a candidate may raise that rejects it (and not the run): a refused configuration, a
# kernel that cannot run here, a generation that diverges.
FAILURES = (ValueError, RuntimeError, TypeError, FloatingPointError, NotImplementedError)
CALIBRATION_PROMPTS = 4  # training captions a calibration made on the fly runs (`cadence calibrate`: 8)


class TooSlow(Exception):
    """A candidate's generation ran past its deadline."""

    def __init__(self, seconds: float):
        super().__init__(f"stopped after {seconds:.1f} s")
        self.seconds = seconds


class Evaluator:
    """One pipeline at one size, step count and guidance scale."""

    def __init__(self, pipe, size: generation.Size, steps: int, guidance_scale: float, device: str, out: Path):
        self.pipe, self.size, self.steps, self.guidance_scale = pipe, size, steps, guidance_scale
        self.device, self.out = device, out
        self.baselines: dict[tuple[str, int], torch.Tensor] = {}
        self.calibrations: dict[str, Path] = {}  # store -> file made on the fly

    # -- generations --------------------------------------------------------------------
    def _generate(self, case: tuple[str, int], steps: int | None = None):
        prompt, seed = case
        return timed(lambda: generation.generate(self.pipe, prompt, steps=steps or self.steps, seed=seed,
                                                 guidance_scale=self.guidance_scale, size=self.size), self.device)

    def _baseline_path(self, case: tuple[str, int]) -> Path:
        prompt, seed = case
        key = json.dumps({"prompt": prompt, "seed": seed, "steps": self.steps, "guidance": self.guidance_scale,
                          "size": str(self.size), "device": torch.device(self.device).type}, sort_keys=True)
        return self.out / "baselines" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"

    def baseline(self, case: tuple[str, int]) -> torch.Tensor:
        """The unaccelerated output of ``case`` (generated once, then read from disk)."""
        if case not in self.baselines:
            path = self._baseline_path(case)
            if path.is_file():
                self.baselines[case] = load_file(str(path))["output"]
            else:
                self.time_baseline(case)
        return self.baselines[case]

    def time_baseline(self, case: tuple[str, int]) -> float:
        """Seconds of one unaccelerated generation of ``case``, now (its output is kept)."""
        output, seconds, _ = self._generate(case)
        if case not in self.baselines:
            path = self._baseline_path(case)
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                save_file({"output": output.contiguous()}, str(path))
            self.baselines[case] = output
        return seconds

    def warm_up(self, recipe: Recipe, case: tuple[str, int]) -> None:
        """An untimed generation: first calls pay for loading, allocation and compilation. One
        step, but every step where the recipe compiles: a step policy may refuse a single step
        (its budget needs several), and what it skips or computes at later steps is traced
        then, which inside a timed generation would be charged to the candidate."""
        steps = self.steps if any(config.name == "compile" for config in recipe.techniques) else 1
        with accelerate(self.pipe, recipe):
            try:
                self._generate(case, steps=steps)
            except (ValueError, RuntimeError):
                pass  # a budget may need more steps; the timed runs report their own failures

    def run(self, recipe: Recipe, case: tuple[str, int], deadline: float | None = None) -> dict:
        """One timed generation of ``recipe`` on ``case`` -> its seconds, PSNR, SSIM and stats;
        ``TooSlow`` if it runs longer than ``deadline`` seconds."""
        reference = self.baseline(case)
        with accelerate(self.pipe, recipe) as acceleration, Deadline(self.pipe.transformer, deadline):
            output, seconds, _ = self._generate(case)
            stats = acceleration.stats()
        return {"seconds": seconds, "psnr": metrics.psnr(output, reference), "ssim": metrics.ssim(output, reference),
                "compute_fraction": stats.get("compute_fraction"), "output": output}

    # -- calibrations on the fly ----------------------------------------------------------
    def prepare(self, recipe: Recipe) -> Recipe:
        """``recipe`` with a calibration made for each technique that has none for this model
        (on training captions, at this size and step count): tried once, calibrated where
        refused for the lack of one, and pointed at the new file."""
        for store, path in self.calibrations.items():  # made for an earlier candidate
            recipe = _pointed_recipe(recipe, store, path)
        for _ in range(len(recipe.techniques) + 1):
            store = self._missing_calibration(recipe)
            if store is None:
                return recipe
            if store in self.calibrations:  # made, and still refused: let the refusal speak
                accelerate(self.pipe, recipe).remove()
            self.calibrations[store] = self._calibrate(store)
            recipe = _pointed_recipe(recipe, store, self.calibrations[store])
        return recipe

    def _missing_calibration(self, recipe: Recipe) -> str | None:
        """The calibration store ``recipe`` is refused for the lack of, or None when it applies."""
        try:
            accelerate(self.pipe, recipe).remove()
        except ValueError as error:
            store = getattr(error, "missing_calibration", None)  # set by cadence.accel.calibration.load
            if store is None:
                raise
            return store
        return None

    def _calibrate(self, store: str) -> Path:
        from cadence.accel.registry import calibrations

        path = (self.out / "calibration" / f"{store}.json").resolve()  # a saved recipe names it from anywhere
        if path.is_file():  # made by an earlier run of this study (resumed)
            return path
        calibration = calibrations()[store]
        runs = generation.calibration_runs(self.pipe, CALIBRATION_PROMPTS, steps=self.steps,
                                           guidance_scale=self.guidance_scale, size=self.size)
        return Path(calibration.run(self.pipe, runs, path))


def _pointed_recipe(recipe: Recipe, store: str, path: Path) -> Recipe:
    return Recipe(_pointed(config, store, path) for config in recipe.techniques)


def _pointed(config, store: str, path: Path):
    """``config`` reading the calibration ``store`` from ``path``, if it reads that store."""
    field = store if store in config.params() else "calibration"
    calibration = get_technique(config.name).calibration
    reads = (calibration is not None and calibration.store == store) or (
        store == "activations" and "calibration" in config.params() and config.level == "bit")
    if not reads or field not in config.params() or config.params()[field]:  # one the user named stays
        return config
    return type(config).from_params({**config.params(), field: str(path)})


class Deadline:
    """A forward pre-hook on the transformer that stops a generation past ``seconds`` (``TooSlow``
    at its next forward: a forward already running is not cut short)."""

    def __init__(self, transformer: torch.nn.Module, seconds: float | None):
        self.transformer, self.seconds, self.handle = transformer, seconds, None

    def __enter__(self):
        if self.seconds is not None:
            start = time.perf_counter()

            def check(module, args, kwargs):
                spent = time.perf_counter() - start
                if spent > self.seconds:
                    raise TooSlow(spent)

            self.handle = self.transformer.register_forward_pre_hook(check, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.remove()
