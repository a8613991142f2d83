"""The benchmark runner: model x recipes x prompts x seeds on one yardstick.

The unaccelerated baseline output of each (prompt, seed) is cached on disk, keyed by
everything that determines it. Its latency is still measured in every run (on the first
prompt and seed when the rest come from the cache: with fixed sizes the cost of a
generation does not depend on the prompt), so each speedup is a ratio of two times taken
in the same run, on the same machine, after a warm-up.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shlex
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import cadence
from cadence.bench import metrics, report
from cadence.recipe import Recipe, accelerate
from cadence.reference import data
from cadence.reference.models import reference_model


@dataclass
class BenchSettings:
    model: str
    recipes: list[Recipe]
    prompts: list[str]
    seeds: list[int]
    out: Path
    steps: int = 20
    guidance_scale: float = 4.0
    device: str = "cpu"
    cache_dir: Path = field(default_factory=lambda: Path(os.environ.get("CADENCE_CACHE", Path.home() / ".cache" / "cadence")))
    videos: bool = False  # also write every output as a GIF (the demo does)
    embeddings: Path | None = None  # precomputed prompt embeddings: run without the text encoder
    command: str = field(default_factory=lambda: shlex.join(["cadence"] + sys.argv[1:]))  # re-runnable


def default_prompts(model: str, source: str, limit: int | None) -> list[str]:
    """``heldout`` (the held-out captions) or a text file with one prompt per line."""
    video = reference_model(model).task == "video"
    if source == "heldout":
        prompts = data.heldout_prompts(limit or 32, video=video)
    else:
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


def timed(pipe, device: str, **kwargs) -> tuple[torch.Tensor, float, int]:
    """-> (output frames or images, seconds, peak memory bytes)."""
    with _PeakMemory(device) as memory:
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            output = pipe(**kwargs)[0]
            end.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(end) / 1000
        else:
            begin = time.perf_counter()
            output = pipe(**kwargs)[0]
            seconds = time.perf_counter() - begin
    return output[0], seconds, memory.peak


def _checkpoint_digest(model: str) -> str:
    weights = sorted(reference_model(model).checkpoint.rglob("*.safetensors"))
    digest = hashlib.sha256()
    for path in weights:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def baseline_key(settings: BenchSettings, digest: str, prompt: str, seed: int) -> str:
    determined_by = {
        "model": settings.model, "weights": digest, "prompt": prompt, "seed": seed, "steps": settings.steps,
        "guidance_scale": settings.guidance_scale, "device": torch.device(settings.device).type,
        "torch": torch.__version__, "cadence": cadence.__version__, **reference_model(settings.model).sample,
    }
    return hashlib.sha256(json.dumps(determined_by, sort_keys=True).encode()).hexdigest()[:24]


def run_bench(settings: BenchSettings) -> tuple[list[dict], list[dict]]:
    """Run everything; write results.jsonl, report.md, pareto.png, samples.png. -> (rows, summary)."""
    if settings.steps <= 0:
        raise ValueError(f"steps={settings.steps} must be a positive integer")
    if not settings.prompts or any(not p.strip() for p in settings.prompts):
        raise ValueError("the prompt list is empty or holds an empty prompt")
    if not settings.seeds:
        raise ValueError("the seed list is empty: give at least one seed")
    check_writable(settings.out)
    pipe = cadence.load(settings.model, device=settings.device, text_encoder=settings.embeddings is None)
    if settings.embeddings is not None:
        from cadence.reference.text import load_prompt_embeddings

        pipe.prompt_cache = load_prompt_embeddings(settings.embeddings)
    pipe.set_progress_bar_config(disable=True)
    generate = dict(steps=settings.steps, guidance_scale=settings.guidance_scale)
    cases = [(prompt, seed) for prompt in settings.prompts for seed in settings.seeds]
    progress = tqdm(total=len(cases) * (1 + len(settings.recipes)) + 1, desc="bench", unit="gen")

    timed(pipe, settings.device, prompt=cases[0][0], seed=cases[0][1], steps=min(2, settings.steps))  # warm-up
    progress.update()
    digest = _checkpoint_digest(settings.model)
    cache = settings.cache_dir / "baselines"
    cache.mkdir(parents=True, exist_ok=True)
    baselines, baseline_times, baseline_memory = {}, [], 0
    for prompt, seed in cases:
        path = cache / f"{baseline_key(settings, digest, prompt, seed)}.safetensors"
        if path.is_file():
            baselines[prompt, seed] = load_file(str(path))["output"]
        else:
            output, seconds, peak = timed(pipe, settings.device, prompt=prompt, seed=seed, **generate)
            save_file({"output": output.contiguous()}, str(path))
            baselines[prompt, seed] = output
            baseline_times.append(seconds)
            baseline_memory = max(baseline_memory, peak)
        progress.update()
    if not baseline_times:  # all cached: time one baseline generation in this run
        _, seconds, baseline_memory = timed(pipe, settings.device, prompt=cases[0][0], seed=cases[0][1], **generate)
        baseline_times.append(seconds)
    baseline_latency = sum(baseline_times) / len(baseline_times)

    rows = [_row(Recipe(), prompt, seed, baseline_latency, baseline_latency, settings.steps, float("inf"), 1.0,
                 baseline_memory, 1.0) for prompt, seed in cases]
    outputs = {str(Recipe()): baselines[cases[0]]}
    failures: dict[str, str] = {}
    partial = open(settings.out / "results.partial.jsonl", "w")  # what an interrupted run leaves
    for recipe in settings.recipes:
        for prompt, seed in cases:
            if str(recipe) in failures:  # one failure is reported; the rest of its cases are skipped
                progress.update()
                continue
            try:
                acceleration = accelerate(pipe, recipe)
            except (ValueError, RuntimeError, TypeError) as error:
                failures[str(recipe)] = f"{type(error).__name__}: {error}"
                progress.update()
                continue
            try:
                output, seconds, peak = timed(pipe, settings.device, prompt=prompt, seed=seed, **generate)
                stats = acceleration.stats()
            except (ValueError, RuntimeError, TypeError) as error:
                failures[str(recipe)] = f"{type(error).__name__}: {error}"
                progress.update()
                continue
            finally:
                acceleration.remove()
            reference = baselines[prompt, seed]
            rows.append(_row(recipe, prompt, seed, seconds, baseline_latency, settings.steps,
                             metrics.psnr(output, reference), metrics.ssim(output, reference), peak,
                             metrics.work_fraction(stats, recipe=recipe)))
            partial.write(json.dumps(rows[-1]) + "\n")
            partial.flush()
            outputs.setdefault(str(recipe), output)
            if settings.videos:
                _write_output(settings.out, recipe, prompt, seed, output)
            progress.update()
    progress.close()
    partial.close()
    (settings.out / "results.partial.jsonl").unlink()
    if settings.videos:
        for prompt, seed in cases:
            _write_output(settings.out, Recipe(), prompt, seed, baselines[prompt, seed])
    for recipe, error in failures.items():
        tqdm.write(f"recipe {recipe} failed: {error}", file=sys.stderr)
    return rows, _write_results(settings, rows, outputs, failures)


def _row(recipe, prompt, seed, seconds, baseline_latency, steps, psnr, ssim, peak, fraction) -> dict:
    return {
        "recipe": str(recipe), "prompt": prompt, "seed": seed, "latency_s": seconds,
        "step_latency_s": seconds / steps, "speedup": baseline_latency / seconds, "psnr": psnr, "ssim": ssim,
        "peak_mem_bytes": peak, "compute_fraction": fraction,
        "ideal_speedup": metrics.ideal_speedup(fraction) if fraction else None,
    }


def _slug(text: str, limit: int = 48) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:limit]


def _write_output(out: Path, recipe: Recipe, prompt: str, seed: int, output: torch.Tensor) -> None:
    videos = out / "videos"
    videos.mkdir(exist_ok=True)
    clip = output if output.dim() == 4 else output[None]  # images become one-frame clips
    report.write_video(videos / f"{_slug(prompt)}-seed{seed}-{_slug(str(recipe), 32)}.gif", clip)


def _write_results(settings: BenchSettings, rows: list[dict], outputs: dict, failures: dict[str, str]) -> list[dict]:
    out = settings.out
    with open(out / "results.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    summary = report.summarize(rows)
    device = torch.cuda.get_device_name() if settings.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    meta = {
        "model": settings.model, "device": device, "torch": torch.__version__, "steps": settings.steps,
        "guidance_scale": settings.guidance_scale, "prompts": len(settings.prompts), "seeds": settings.seeds,
        "date": date.today().isoformat(), "command": settings.command,
    }
    if failures:
        meta["failed"] = "; ".join(f"{recipe}: {error}" for recipe, error in failures.items())
    report.write_report(out / "report.md", summary, meta)
    report.plot_pareto(out / "pareto.png", summary)
    prompt, seed = settings.prompts[0], settings.seeds[0]
    report.sample_strip(out / "samples.png", list(outputs.items()), title=f"{prompt} (seed {seed})")
    return summary


def format_table(summary: list[dict]) -> str:
    header = f"{'recipe':<36} {'time (s)':>9} {'speedup':>8} {'ideal':>6} {'PSNR (dB)':>10} {'SSIM':>6}"
    lines = [header, "-" * len(header)]
    for s in summary:
        ideal = f"{s['ideal_speedup']:.2f}" if s.get("ideal_speedup") else "-"
        psnr = "inf" if s["psnr_mean"] == float("inf") else f"{s['psnr_mean']:.2f}"
        lines.append(f"{s['recipe']:<36} {s['latency_s']:>9.2f} {s['speedup']:>7.2f}x {ideal:>6} {psnr:>10} {s['ssim_mean']:>6.4f}")
    return "\n".join(lines)
