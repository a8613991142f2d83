"""A reference model's own quality as the judge sees it, and how the judge's metrics move
as its samples are degraded on purpose (fewer steps, added noise, blur, the wrong prompt).

    PYTHONPATH=src python benchmarks/judge_quality.py --model ref-video --steps 50 8 2 --prompts 16 --out q.json
    PYTHONPATH=src python benchmarks/judge_quality.py --model ref-image --steps 50 --prompts 32 --out qi.json
    PYTHONPATH=src python benchmarks/judge_quality.py --model ref-video-4step --steps 4 --prompts 64 --no-degradations --out s.json

A model runs at its own guidance (``generation.sampling``): 4.0, or a distilled student's 1.0.

The prompts are the held-out captions (data.heldout_prompts). Generations are cached in
``--cache`` (a safetensors file per model, steps, prompt and seed set), so a second run only
judges. For each step count: adherence (pooled and per attribute), FD against renders of
the same captions (videos), frame consistency (videos); for the first step count also the
degradations: Gaussian noise (sigma 0.1, 0.3), a 3x3 / 5x5 box blur, and every clip judged
against the next prompt's caption.

``--recipes R1 R2 ...`` judges cadence recipes instead of step counts (issue 16, item 5: the
caching and sparse frontiers in the judge's terms): the unaccelerated pipeline first, then each
recipe applied with ``cadence.accelerate``, all at the first ``--steps`` on the same captions and
seeds. Per recipe: adherence (and per attribute), FD, consistency, PSNR / SSIM of its clips
against the baseline's (``cadence.bench.metrics``), the median wall time of one generation and
its speedup over the baseline's (measured on ``--device``; on a GPU the reference models are
launch-bound, so it understates what the recipe gives at the real size), and the ideal speedup
at the Wan2.1-1.3B size (``work_fraction``). ``caching`` and ``sparse`` name the sets below;
``--recipes`` alone judges both. Writes ``--out`` and the frontier beside it (``NAME.png``:
adherence and FD against speedup). Degradations are not run with ``--recipes``.

    PYTHONPATH=src python benchmarks/judge_quality.py --prompts 32 --prepare-embeddings \
        .carry/judge-heldout-32.safetensors                        # CPU: the GPU machine has no text encoder
    bash benchmarks/gpu/run.sh --timeout 230 judge_quality.py --model ref-video --steps 50 --prompts 32 \
        --device cuda --embeddings .carry/judge-heldout-32.safetensors --recipes caching \
        --out $OUT/judge-caching-video.json      # GPU: 206 s on an H200; then --recipes sparse, --timeout 560
    PYTHONPATH=src python benchmarks/judge_quality.py --model ref-video --steps 3 --prompts 2 \
        --recipes "magcache(budget=0.6)" "sparse-window(density=0.5, block=16)" --out /tmp/jq.json     # CPU check
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from sparse_sweep import BLOCK, PATTERNS

import cadence
from cadence import generation
from cadence.bench.frontier import technique_of
from cadence.bench.metrics import psnr, ssim, work_fraction
from cadence.judge import checkpoint, score
from cadence.loading import reference_of
from cadence.recipe import BASELINE, Recipe
from cadence.reference import data
from cadence.reference.models import REFERENCE_MODELS, STUDENTS

# Issue 16's frontiers on ref-video: the caching policies whose calibration ref-video ships
# (MagCache, TeaCache) and First-Block at equal budgets, and every sparse pattern at densities
# 0.5 / 0.25 in sparse_sweep.py's blocks (16 tokens: 64 blocks of ref-video's 1,024).
CACHING = [f"{policy}(budget={budget})" for policy in ("magcache", "teacache", "first-blocks")
           for budget in (0.3, 0.45, 0.6)]
SPARSE = [f"{pattern}(density={density}, block={BLOCK})" for pattern in PATTERNS for density in (0.5, 0.25)]
RECIPE_SETS = {"caching": CACHING, "sparse": SPARSE}


def expand_recipes(given: list[str]) -> list[str]:
    """The recipes to judge, the baseline first: set names expanded (none given: every set),
    each recipe once in its canonical spelling (the cache key's). A recipe cadence cannot
    parse is refused here, before any model loads."""
    recipes = [BASELINE]
    for name in [r for g in (given or list(RECIPE_SETS)) for r in RECIPE_SETS.get(g, [g])]:
        try:
            text = str(Recipe.parse(name))
        except ValueError as error:
            raise SystemExit(f"--recipes {name!r}: {error}; or a set: {', '.join(RECIPE_SETS)}") from None
        if text not in recipes:
            recipes.append(text)
    return recipes


def cache_path(cache: Path, model: str, prompts: list[str], seeds: list[int], steps: int, recipe: str,
               device: str = "cpu") -> Path:
    # The CPU's baseline keeps the key this script gave before --recipes and devices: its stored
    # generations stay valid. Another device's clips (and timings) are its own.
    kind = torch.device(device).type
    fields = [model, prompts, seeds, steps] + ([] if recipe == BASELINE else [recipe]) + ([] if kind == "cpu" else [kind])
    key = hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]
    return cache / f"{Path(model).name}-{steps}steps-{key}.safetensors"


def load_pipeline(model: str, device: str, embeddings: Path | None):
    pipe = cadence.load(model, device=device, text_encoder=embeddings is None)
    if embeddings is not None:
        from cadence.reference.text import load_prompt_embeddings

        pipe.prompt_cache = load_prompt_embeddings(embeddings)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate_all(model: str, prompts: list[str], seeds: list[int], steps: int, device: str, cache: Path,
                 embeddings: Path | None, recipe: str = BASELINE, load=None) -> tuple[list[torch.Tensor], dict]:
    """The clips of every prompt x seed under ``recipe``, and how they were made: the wall
    seconds of each generation and the recipe's ideal speedup at the real size (both None
    for a cache file written before they were stored). ``load``: a function that gives the
    pipeline, called only when the cache misses (default: ``model`` loaded anew)."""
    path = cache_path(cache, model, prompts, seeds, steps, recipe, device)
    if path.is_file():
        with safe_open(str(path), "pt") as stored:
            made = json.loads((stored.metadata() or {}).get("made", "{}"))
            clips = [stored.get_tensor(str(i)) for i in range(len(list(stored.keys())))]
        return clips, {"seconds": made.get("seconds"), "ideal_speedup": made.get("ideal_speedup")}
    pipe = load() if load is not None else load_pipeline(model, device, embeddings)
    size = generation.resolve_size(pipe)
    _, guidance = generation.sampling(pipe, steps)
    outputs, seconds = [], []
    acceleration = cadence.accelerate(pipe, recipe)
    try:
        for prompt in prompts:
            for seed in seeds:
                began = time.perf_counter()  # .cpu() waits for the device: the whole generation
                outputs.append(generation.generate(pipe, prompt, steps=steps, seed=seed, guidance_scale=guidance,
                                                   size=size).cpu())
                seconds.append(time.perf_counter() - began)
        fraction = work_fraction(acceleration.stats(), recipe=acceleration.recipe) or 1.0
    finally:
        acceleration.remove()
    made = {"seconds": seconds, "ideal_speedup": 1 / fraction}
    cache.mkdir(parents=True, exist_ok=True)
    save_file({str(i): o.contiguous() for i, o in enumerate(outputs)}, str(path),
              metadata={"made": json.dumps(made), "recipe": recipe})
    return outputs, made


def blur(clip: torch.Tensor, width: int) -> torch.Tensor:
    """Box blur of every frame, ``width`` x ``width`` (replicate padding)."""
    frames = clip if clip.dim() == 4 else clip[None]
    padded = F.pad(frames, [width // 2] * 4, mode="replicate")
    kernel = torch.full((3, 1, width, width), 1.0 / width**2)
    out = F.conv2d(padded, kernel, groups=3)
    return out if clip.dim() == 4 else out[0]


def noisy(clip: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (clip + sigma * torch.randn(clip.shape, generator=generator)).clamp(-1, 1)


def measure(judge, clips: list[torch.Tensor], captions: list[str]) -> dict:
    result = score.judge_clips(clips, captions, judge)
    result.pop("per_clip")
    if clips[0].dim() == 4:
        result["consistency"] = sum(score.consistency(c, judge)["consistency"] for c in clips) / len(clips)
    return result


def fidelity(clips: list[torch.Tensor], reference: list[torch.Tensor]) -> dict:
    """PSNR / SSIM of each clip against the baseline's of the same prompt and seed. The PSNR
    mean is over the clips that differ (an identical one is +inf), as cadence bench reports it."""
    psnrs = [psnr(c, r) for c, r in zip(clips, reference)]
    finite = [v for v in psnrs if math.isfinite(v)]
    return {"psnr": sum(finite) / len(finite) if finite else None, "psnr_min": min(finite, default=None),
            "n_identical": len(psnrs) - len(finite),
            "ssim": sum(ssim(c, r) for c, r in zip(clips, reference)) / len(clips)}


def speed(made: dict, baseline: dict) -> dict:
    """The median wall time of one generation (the first, with the device's warm-up, and any
    stray slow one do not move it) and its ratio to the baseline's."""
    if not made["seconds"] or not baseline["seconds"]:
        return {"seconds_per_generation": None, "speedup": None, "ideal_speedup": made["ideal_speedup"]}
    median = statistics.median(made["seconds"])
    return {"seconds_per_generation": median, "speedup": statistics.median(baseline["seconds"]) / median,
            "ideal_speedup": made["ideal_speedup"]}


def plot_frontier(path: Path, rows: list[dict], x_key: str = "speedup", title: str = "") -> Path:
    """Two panels, adherence and FD against speed: one line per technique through its
    settings, the baseline a star (FD: lower is better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row.get(x_key) is not None:
            groups.setdefault(technique_of(row["recipe"]), []).append(row)
    for ax, (y_key, label) in zip(axes, [("adherence", "adherence (share of caption attributes read back)"),
                                         ("fd", "FD against renders (lower is better)")]):
        for index, (name, members) in enumerate(groups.items()):
            points = sorted((r[x_key], r[y_key]) for r in members if r.get(y_key) is not None)
            if not points:
                continue
            style = {"marker": "*", "markersize": 14, "color": "black"} if name == BASELINE else \
                {"marker": "o", "markersize": 5, "color": plt.get_cmap("tab10")(index % 10)}
            ax.plot([p[0] for p in points], [p[1] for p in points], label=name, linewidth=1.5, zorder=3, **style)
        ax.set_xlabel("measured speedup over the baseline" if x_key == "speedup" else "ideal speedup at Wan2.1-1.3B size")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def judge_recipes(args, recipes: list[str], judge, prompts: list[str], seeds: list[int], captions: list[str],
                  results: dict) -> list:
    """One row per recipe (the baseline first), the clips of the last one returned."""
    steps = args.steps[0]
    load = functools.cache(lambda: load_pipeline(args.model, args.device, args.embeddings))
    baseline_clips = baseline = None
    for recipe in recipes:
        clips, made = generate_all(args.model, prompts, seeds, steps, args.device, args.cache, args.embeddings,
                                   recipe, load)
        baseline_clips, baseline = (clips, made) if recipe == BASELINE else (baseline_clips, baseline)
        row = {"name": f"{steps} steps, {recipe}", "recipe": recipe, **measure(judge, clips, captions),
               **fidelity(clips, baseline_clips), **speed(made, baseline)}
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        # What finished survives a time-out; the generations stay in --cache, so the same
        # command run again on the same machine judges them without generating them again.
        args.out.with_name(args.out.name + ".partial").write_text(json.dumps(results, indent=1))
    return clips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ref-video")
    parser.add_argument("--steps", type=int, nargs="+", default=[50])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--judge", type=Path, default=checkpoint.WEIGHTS)
    parser.add_argument("--embeddings", type=Path, default=None, help="precomputed prompt embeddings (no text encoder)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/cadence-judge-quality"))
    parser.add_argument("--no-degradations", action="store_true")
    parser.add_argument("--recipes", nargs="*", default=None,
                        help=f"judge these recipes (or sets: {', '.join(RECIPE_SETS)}; none named: all) against the "
                             "baseline at the first --steps, instead of step counts and degradations")
    parser.add_argument("--x", choices=["speedup", "ideal_speedup"], default="speedup",
                        help="the frontier's x axis: measured speedup, or the ideal one at the real size")
    parser.add_argument("--prepare-embeddings", type=Path, default=None,
                        help="write the embeddings of the --prompts held-out captions (and the empty negative) to "
                             "this file for --embeddings, and stop (CPU: needs the text encoder)")
    parser.add_argument("--out", type=Path, default=None, help="the JSON results (required unless preparing)")
    args = parser.parse_args()
    if args.prepare_embeddings is None and args.out is None:
        parser.error("--out is required (the results file)")
    if args.recipes is not None and len(args.steps) != 1:
        parser.error(f"--steps {' '.join(map(str, args.steps))}: --recipes judges one step count, give one")
    recipes = expand_recipes(args.recipes) if args.recipes is not None else None  # refused before a model loads
    reference = reference_of(args.model)
    if reference is None:
        parser.error(f"--model {args.model!r}: valid: a reference model ({', '.join(REFERENCE_MODELS)}), a shipped "
                     f"student ({', '.join(STUDENTS)}: those with a folder), or a student folder of one")
    video = reference.task == "video"
    prompts = data.heldout_prompts(args.prompts, video=video)
    if args.prepare_embeddings is not None:
        from cadence.reference.text import save_prompt_embeddings

        print(f"wrote {save_prompt_embeddings(prompts, args.prepare_embeddings)} ({len(prompts)} held-out captions)")
        return
    seeds = list(range(args.seeds))
    captions = [p for p in prompts for _ in seeds]
    judge = checkpoint.load(args.judge)
    results = {"model": args.model, "prompts": len(prompts), "seeds": args.seeds, "torch": torch.__version__,
               "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU",
               "date": time.strftime("%Y-%m-%d"), "rows": []}
    if args.recipes is not None:
        clips = judge_recipes(args, recipes, judge, prompts, seeds, captions, results)
    for index, steps in enumerate([] if args.recipes is not None else args.steps):
        begin = time.perf_counter()
        clips, _ = generate_all(args.model, prompts, seeds, steps, args.device, args.cache, args.embeddings)
        generated = time.perf_counter() - begin
        rows = [(f"{steps} steps", clips, captions)]
        if index == 0 and not args.no_degradations:
            wrong = captions[1:] + captions[:1]
            rows += [
                (f"{steps} steps + noise 0.1", [noisy(c, 0.1, i) for i, c in enumerate(clips)], captions),
                (f"{steps} steps + noise 0.3", [noisy(c, 0.3, i) for i, c in enumerate(clips)], captions),
                (f"{steps} steps + blur 3", [blur(c, 3) for c in clips], captions),
                (f"{steps} steps + blur 5", [blur(c, 5) for c in clips], captions),
                (f"{steps} steps, wrong prompt", clips, wrong),
            ]
        for name, row_clips, row_captions in rows:
            row = {"name": name, **measure(judge, row_clips, row_captions), "generate_seconds": round(generated, 1)}
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    rendered = score.rendered_like(clips, [data.parse_caption(c) for c in captions], seeds=(7,)) if video else \
        [data.render_images([data.parse_caption(c)], seed=7 + i)[0] for i, c in enumerate(captions)]
    results["rows"].append({"name": "renders of the captions", **measure(judge, rendered, captions)})
    print(json.dumps(results["rows"][-1]), flush=True)
    args.out.write_text(json.dumps(results, indent=1))
    if args.recipes is not None:
        title = (f"{args.model}, {args.steps[0]} steps, {len(prompts)} held-out captions x {args.seeds} seeds, "
                 f"{results['device']}; up and right is better for adherence")
        print(f"wrote {plot_frontier(args.out.with_suffix('.png'), results['rows'][:-1], args.x, title)}")


if __name__ == "__main__":
    main()
