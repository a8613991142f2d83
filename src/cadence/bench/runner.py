"""The benchmark runner: model x recipes x prompts x seeds on one yardstick.

The model is a reference model or a local diffusers checkpoint directory; every generation
goes through :mod:`cadence.generation`, so each pipeline is called in its own argument names
and every output is compared as pixels in [-1, 1].

Timing on a shared machine: a speedup is a ratio of two times, and a load that changes
between them moves it (timed as all baselines first and the recipes after, a load change
gave 4.31x against an ideal of 2.50x). So baseline and recipe generations alternate: for
each (prompt, seed), every recipe runs between two baseline generations (B R1 B R2 B; the
last of them is the next case's baseline, and with fixed sizes the cost of a generation does
not depend on the prompt), and its speedup is taken against the mean of the two around it.
When those two differ by more than ``spread_tolerance`` the load changed while it ran: the
recipe and the baseline after it run again, up to ``max_rounds`` times, and the quietest
round is kept. Every row carries the spread of that round; the report flags a high spread
and a speedup above its ideal.

The unaccelerated baseline *output* of each (prompt, seed) is cached on disk, keyed by
everything that determines it; its *timing* is taken in every run, interleaved as above.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import cadence
from cadence import generation
from cadence.bench import metrics, quality, report
from cadence.command import command_line
from cadence.loading import reference_of, student_record
from cadence.recipe import Recipe, accelerate
from cadence.reference import data
from cadence.reference.models import REFERENCE_MODELS, STUDENTS, reference_model


@dataclass
class BenchSettings:
    model: str  # a reference model's name or a diffusers checkpoint directory
    recipes: list[Recipe]
    prompts: list[str]
    seeds: list[int]
    out: Path
    steps: int | None = 20  # None: the model's own (a distilled student's K, guidance 1: generation.sampling)
    guidance_scale: float | None = 4.0
    device: str = "cpu"
    height: int | None = None  # None: the checkpoint's own default
    width: int | None = None
    frames: int | None = None
    cache_dir: Path = field(default_factory=lambda: Path(os.environ.get("CADENCE_CACHE", Path.home() / ".cache" / "cadence")))
    videos: bool = False  # also write every output as a GIF (the demo does)
    embeddings: Path | None = None  # precomputed prompt embeddings: run without the text encoder
    spread_tolerance: float = report.SPREAD_TOLERANCE  # a round whose bracketing baselines differ more is rerun
    max_rounds: int = 3
    command: str = field(default_factory=command_line)  # re-runnable


def default_prompts(model: str, source: str, limit: int | None) -> list[str]:
    """``heldout`` (the held-out captions of a reference model, or of a shipped student's teacher)
    or a text file with one prompt per line."""
    if source == "heldout":
        reference = reference_of(model)
        if reference is None:
            raise ValueError(f"--prompts heldout: the held-out captions are the reference models' own (and their "
                             f"shipped students'); for {model!r} give a text file with one prompt per line")
        return data.heldout_prompts(limit or 32, video=reference.task == "video")
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"--prompts {source!r}: expected 'heldout' or a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {source!r} holds no prompts")
    return prompts[:limit] if limit else prompts


def check_writable(out: Path) -> None:
    """Fail before any heavy work if the output directory cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".cadence-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"output directory {str(out)!r} is not writable: {error.strerror or error}") from None


class _PeakMemory:
    """Peak CUDA allocated bytes, or peak resident set size on the CPU (sampled)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak, self._stop = _rss(), threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss())


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the process high-water mark is the best there is
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed(run: Callable[[], torch.Tensor], device: str) -> tuple[torch.Tensor, float, int]:
    """-> (what ``run()`` returns, seconds, peak memory bytes)."""
    with _PeakMemory(device) as memory:
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            output = run()
            end.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(end) / 1000
        else:
            begin = time.perf_counter()
            output = run()
            seconds = time.perf_counter() - begin
    return output, seconds, memory.peak


# Files above this size are fingerprinted by size and modification time, not read whole:
# hashing a real checkpoint's every byte would take minutes.
_HASHED_WHOLE = 64 * 2**20


def _checkpoint_digest(model: str) -> str:
    """The weights and configs a baseline output depends on (calibrations excluded); a shipped
    student's include its teacher's, which its packed weights are a difference from."""
    root = reference_model(model).checkpoint if model in REFERENCE_MODELS else STUDENTS.get(model, Path(model))
    digest = hashlib.sha256()
    teacher = (student_record(model) or {}).get("teacher") if model in STUDENTS else None
    if teacher in REFERENCE_MODELS:
        digest.update(_checkpoint_digest(teacher).encode())
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.suffix not in (".safetensors", ".xz", ".json") or "calibration" in path.parts:
            continue
        digest.update(str(path.relative_to(root)).encode())
        stat = path.stat()
        digest.update(path.read_bytes() if stat.st_size <= _HASHED_WHOLE else f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def baseline_key(settings: BenchSettings, digest: str, prompt: str, seed: int,
                 size: generation.Size | None = None) -> str:
    chosen = {"height": size.height, "width": size.width, "frames": size.frames} if size else \
        {"height": settings.height, "width": settings.width, "frames": settings.frames}
    determined_by = {
        "model": settings.model, "weights": digest, "prompt": prompt, "seed": seed, "steps": settings.steps,
        "guidance_scale": settings.guidance_scale, "device": torch.device(settings.device).type,
        "torch": torch.__version__, "cadence": cadence.__version__, **chosen,
    }
    return hashlib.sha256(json.dumps(determined_by, sort_keys=True).encode()).hexdigest()[:24]


def check_settings(settings: BenchSettings) -> None:
    """Everything that can be refused before the model loads."""
    steps, guidance_scale = generation.sampling(None, settings.steps, settings.guidance_scale)  # what is given
    generation.check_steps(steps)
    generation.check_guidance_scale(guidance_scale)
    if not settings.prompts or any(not p.strip() for p in settings.prompts):
        raise ValueError("the prompt list is empty or holds an empty prompt")
    if not settings.seeds:
        raise ValueError("the seed list is empty: give at least one seed")
    generation.check_count("prompts", len(settings.prompts), generation.MAX_PROMPTS)
    generation.check_count("seeds", len(settings.seeds), generation.MAX_SEEDS)
    for seed in settings.seeds:
        generation.check_seed(seed)
    generation.check_size_values(settings.height, settings.width, settings.frames)
    if not 0 < settings.spread_tolerance:
        raise ValueError(f"spread_tolerance={settings.spread_tolerance} must be > 0")
    generation.check_count("max_rounds", settings.max_rounds, 10)


@dataclass
class _Round:
    """One timing of a recipe on one (prompt, seed): its generation between two baseline ones."""

    opening: float  # baseline seconds before it
    seconds: float  # the recipe's
    closing: float  # baseline seconds after it

    @property
    def baseline(self) -> float:
        return (self.opening + self.closing) / 2

    @property
    def spread(self) -> float:
        """How much the two baseline times differ, relative to their mean."""
        return abs(self.opening - self.closing) / self.baseline


def run_bench(settings: BenchSettings) -> tuple[list[dict], list[dict]]:
    """Run everything; write results.jsonl, report.md, pareto.png, samples.png. -> (rows, summary)."""
    check_settings(settings)
    check_writable(settings.out)
    if quality.judged(settings.model, settings.prompts):
        quality.check_judge()  # a damaged judge checkpoint is refused before the model loads, not after the run
    pipe = cadence.load(settings.model, device=settings.device, text_encoder=settings.embeddings is None)
    if settings.embeddings is not None:
        from cadence.reference.text import load_prompt_embeddings

        pipe.prompt_cache = load_prompt_embeddings(settings.embeddings)
    pipe.set_progress_bar_config(disable=True)
    size = generation.resolve_size(pipe, settings.height, settings.width, settings.frames)
    steps, guidance_scale = generation.sampling(pipe, settings.steps, settings.guidance_scale)
    settings = replace(settings, steps=steps, guidance_scale=guidance_scale)
    generation.check_steps(settings.steps, generation.step_limit(pipe))
    return _Bench(settings, pipe, size).run()


class _Bench:
    """One bench run: the interleaved timing rounds and what they leave."""

    def __init__(self, settings: BenchSettings, pipe, size: generation.Size):
        self.settings, self.pipe, self.size = settings, pipe, size
        self.cases = [(prompt, seed) for prompt in settings.prompts for seed in settings.seeds]
        self.digest = _checkpoint_digest(settings.model)
        self.cache = settings.cache_dir / "baselines"
        self.baselines: dict[tuple[str, int], torch.Tensor] = {}
        self.baseline_memory = 0
        self.failures: dict[str, str] = {}
        self.notes: dict[str, list[str]] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.load_before = _load_average()
        # Every recipe output, for the judge (adherence, FD): reference-world prompts only.
        self.judged = quality.judged(settings.model, settings.prompts)
        self.judge_inputs: dict[str, dict[tuple[str, int], torch.Tensor]] = {}

    def generate(self, prompt: str, seed: int, steps: int | None = None):
        settings = self.settings
        return timed(lambda: generation.generate(self.pipe, prompt, steps=steps or settings.steps, seed=seed,
                                                 guidance_scale=settings.guidance_scale, size=self.size),
                     settings.device)

    def baseline(self, case: tuple[str, int]) -> float:
        """Time one baseline generation of ``case``; its output is kept (and cached) the first time."""
        output, seconds, peak = self.generate(*case)
        self.baseline_memory = max(self.baseline_memory, peak)
        if case not in self.baselines:
            path = self.cache / f"{baseline_key(self.settings, self.digest, *case, size=self.size)}.safetensors"
            if path.is_file():
                self.baselines[case] = load_file(str(path))["output"]
            else:
                save_file({"output": output.contiguous()}, str(path))
                self.baselines[case] = output
        return seconds

    def accelerated(self, recipe: Recipe, case: tuple[str, int], steps: int | None = None):
        """-> (output, seconds, peak, stats) of ``recipe`` on ``case``, or None after recording its failure."""
        try:
            acceleration = accelerate(self.pipe, recipe)
        except (ValueError, RuntimeError, TypeError) as error:
            self.failures[str(recipe)] = f"{type(error).__name__}: {error}"
            return None
        try:
            output, seconds, peak = self.generate(*case, steps=steps)
            stats = acceleration.stats()
            for note in acceleration.notes() if steps is None else ():
                if note not in self.notes.setdefault(str(recipe), []):
                    self.notes[str(recipe)].append(note)
        except (ValueError, RuntimeError, TypeError, FloatingPointError) as error:
            self.failures[str(recipe)] = f"{type(error).__name__}: {error}"
            return None
        finally:
            acceleration.remove()
        return output, seconds, peak, stats

    def warm_up(self) -> None:
        """First calls pay for allocation and compilation: a short generation of the baseline
        and a one-step one of each recipe (compile traces every block in it), untimed. A
        recipe that fails here is not judged by it (a budget may need more steps): the
        timed runs report their own failures."""
        self.generate(*self.cases[0], steps=min(2, self.settings.steps))
        for recipe in self.settings.recipes:
            self.accelerated(recipe, self.cases[0], steps=1)
        self.failures.clear()

    def run(self) -> tuple[list[dict], list[dict]]:
        settings = self.settings
        self.cache.mkdir(parents=True, exist_ok=True)
        self.warm_up()
        progress = tqdm(total=len(self.cases), desc="bench", unit="case")
        rows: list[dict] = []
        partial = open(settings.out / "results.partial.jsonl", "w")  # what an interrupted run leaves
        opening = None
        for index, case in enumerate(self.cases):
            if case not in self.baselines:  # the first case, or one after a case whose recipes all failed
                opening = self.baseline(case)
            following = self.cases[min(index + 1, len(self.cases) - 1)]
            live = [recipe for recipe in settings.recipes if str(recipe) not in self.failures]
            kept: dict[str, tuple[_Round, int, tuple]] = {}
            for position, recipe in enumerate(live):
                after = following if position == len(live) - 1 else case  # the last one closes on the next case
                rounds, first = [], None
                while len(rounds) < settings.max_rounds:
                    result = self.accelerated(recipe, case)
                    if result is None:  # one failure is reported; the recipe's other cases are skipped
                        break
                    first = first or result
                    closing = self.baseline(after)
                    rounds.append(_Round(opening, result[1], closing))
                    opening = closing
                    if rounds[-1].spread <= settings.spread_tolerance:
                        break
                if rounds and str(recipe) not in self.failures:
                    kept[str(recipe)] = (min(rounds, key=lambda timing: timing.spread), len(rounds), first)
            case_rows = self._rows(case, kept, opening)
            for row in case_rows:
                partial.write(json.dumps(row) + "\n")
            partial.flush()
            rows += case_rows
            progress.update()
        progress.close()
        partial.close()
        (settings.out / "results.partial.jsonl").unlink()
        if settings.videos:
            for prompt, seed in self.cases:
                _write_output(settings.out, Recipe(), prompt, seed, self.baselines[prompt, seed])
        for recipe, error in self.failures.items():
            tqdm.write(f"recipe {recipe} failed: {error}", file=sys.stderr)
        self._judge(rows)
        self.outputs = {str(Recipe()): self.baselines[self.cases[0]], **self.outputs}
        load = None
        if not settings.device.startswith("cuda") and self.load_before is not None:
            # Other processes on the CPU: torch's threads wait on each other when a core is taken.
            load = f"{self.load_before:.2f} at the start, {_load_average():.2f} at the end ({os.cpu_count()} cores)"
        notes = dict(self.notes)
        if not self.judged:
            notes["judge"] = [("adherence and FD not measured: the judge reads only captions of the reference "
                               "models' world (`cadence prompts`), and these prompts or this model are not")]
        return rows, _write_results(settings, rows, self.outputs, self.failures, notes, load)

    def _judge(self, rows: list[dict]) -> None:
        """Add the judge's ``adherence`` (per output) and ``fd`` (per recipe, over all its
        outputs) to the rows, the baseline's included."""
        if not self.judged or not rows:
            return
        outputs = {str(Recipe()): {case: self.baselines[case] for case in self.cases if case in self.baselines},
                   **self.judge_inputs}
        results = quality.judge_outputs({recipe: [(case[0], output) for case, output in by_case.items()]
                                         for recipe, by_case in outputs.items()}, self.settings.device)
        position = {(recipe, case): index for recipe, by_case in outputs.items() for index, case in enumerate(by_case)}
        for row in rows:
            key = (row["recipe"], (row["prompt"], row["seed"]))
            if key in position:
                row.update(results[row["recipe"]]["per_output"][position[key]], fd=results[row["recipe"]]["fd"])

    def _rows(self, case, kept: dict[str, tuple[_Round, int, tuple]], last_baseline: float) -> list[dict]:
        """The baseline row of ``case`` and one row per recipe, timed in its quietest round,
        measured on its first output."""
        settings, (prompt, seed) = self.settings, case
        timings = [timing for timing, _, _ in kept.values()]
        baseline = sum(t.baseline for t in timings) / len(timings) if timings else last_baseline
        rows = [_row(Recipe(), prompt, seed, baseline, baseline, settings.steps, float("inf"), 1.0,
                     self.baseline_memory, 1.0, spread=max((t.spread for t in timings), default=0.0),
                     rounds=max((count for _, count, _ in kept.values()), default=1))]
        reference = self.baselines[case]
        for recipe in settings.recipes:
            if str(recipe) not in kept:
                continue
            timing, count, (output, _, peak, stats) = kept[str(recipe)]
            rows.append(_row(recipe, prompt, seed, timing.seconds, timing.baseline, settings.steps,
                             metrics.psnr(output, reference), metrics.ssim(output, reference), peak,
                             metrics.work_fraction(stats, recipe=recipe), spread=timing.spread, rounds=count))
            self.outputs.setdefault(str(recipe), output)
            if self.judged:
                self.judge_inputs.setdefault(str(recipe), {})[case] = output
            if settings.videos:
                _write_output(settings.out, recipe, prompt, seed, output)
        return rows


def _row(recipe, prompt, seed, seconds, baseline_latency, steps, psnr, ssim, peak, fraction, spread, rounds) -> dict:
    return {
        "recipe": str(recipe), "recipe_params": recipe.spelled_out(), "prompt": prompt, "seed": seed,
        "latency_s": seconds, "step_latency_s": seconds / steps, "baseline_latency_s": baseline_latency,
        "speedup": baseline_latency / seconds, "psnr": psnr, "ssim": ssim, "peak_mem_bytes": peak,
        "compute_fraction": fraction, "ideal_speedup": metrics.ideal_speedup(fraction) if fraction else None,
        "spread": spread, "rounds": rounds,
    }


def _slug(text: str, limit: int = 48) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:limit]


def _write_output(out: Path, recipe: Recipe, prompt: str, seed: int, output: torch.Tensor) -> None:
    videos = out / "videos"
    videos.mkdir(exist_ok=True)
    clip = output if output.dim() == 4 else output[None]  # images become one-frame clips
    report.write_video(videos / f"{_slug(prompt)}-seed{seed}-{_slug(str(recipe), 32)}.gif", clip)


def _load_average() -> float | None:
    """The machine's one-minute load average (processes running or waiting), where known."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _write_results(settings: BenchSettings, rows: list[dict], outputs: dict, failures: dict[str, str],
                   notes: dict[str, list[str]], load: str | None = None) -> list[dict]:
    out = settings.out
    with open(out / "results.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    summary = report.summarize(rows, spread_tolerance=settings.spread_tolerance)
    device = torch.cuda.get_device_name() if settings.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    meta = {
        "model": settings.model, "device": device, "torch": torch.__version__, "steps": settings.steps,
        "guidance_scale": settings.guidance_scale, "prompts": len(settings.prompts), "seeds": settings.seeds,
        "date": date.today().isoformat(), "command": settings.command,
    }
    if load is not None:
        meta["load average"] = load
    if failures:
        meta["failed"] = "; ".join(f"{recipe}: {error}" for recipe, error in failures.items())
    if notes:
        meta["notes"] = "; ".join(note for recipe_notes in notes.values() for note in recipe_notes)
    report.write_report(out / "report.md", summary, meta)
    report.plot_pareto(out / "pareto.png", summary)
    prompt, seed = settings.prompts[0], settings.seeds[0]
    report.sample_strip(out / "samples.png", list(outputs.items()), title=f"{prompt} (seed {seed})")
    return summary


def format_table(summary: list[dict]) -> str:
    judged = any(s.get("adherence") is not None for s in summary)
    header = f"{'recipe':<36} {'time (s)':>9} {'speedup':>8} {'ideal':>6} {'spread':>7} {'PSNR (dB)':>10} {'SSIM':>6}"
    header += f" {'adherence':>9} {'FD':>7}" if judged else ""
    lines = [header, "-" * len(header)]
    for s in summary:
        ideal = f"{s['ideal_speedup']:.2f}" if s.get("ideal_speedup") else "-"
        spread = f"{s['spread']:.0%}" if s.get("spread") is not None else "-"
        psnr = "inf" if s["psnr_mean"] == float("inf") else f"{s['psnr_mean']:.2f}"
        line = (f"{s['recipe']:<36} {s['latency_s']:>9.2f} {s['speedup']:>7.2f}x {ideal:>6} {spread:>7} "
                f"{psnr:>10} {s['ssim_mean']:>6.4f}")
        if judged:
            adherence = f"{s['adherence']:.1%}" if s.get("adherence") is not None else "-"
            fd = f"{s['fd']:.2f}" if s.get("fd") is not None else "-"
            line += f" {adherence:>9} {fd:>7}"
        lines.append(line)
    lines += [f"check: {s['recipe']}: {flag}" for s in summary for flag in s.get("flags", ())]
    return "\n".join(lines)
