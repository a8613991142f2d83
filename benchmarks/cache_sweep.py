"""Caching policies and diffusers' own hooks, swept on a reference model in one run.

Every cadence policy runs in budget mode at the same budgets (equal cost), every peer at
the setting its docs recommend and a sweep around it; all on the same held-out prompts
and seeds, against the same unaccelerated outputs. Writes the bench files (results.jsonl,
report.md, samples.png) and frontier.png / frontier.md: speed vs PSNR and SSIM per
technique, and for each peer setting whether cadence has a setting at least as fast with
higher PSNR.

    python benchmarks/cache_sweep.py --prepare-embeddings .carry/heldout-embeddings.safetensors  # CPU
    python benchmarks/cache_sweep.py --model ref-video --embeddings .carry/heldout-embeddings.safetensors \
        --out $OUT/sweep-video                                                                    # GPU

The GPU machine has no text encoder: the held-out prompts' embeddings are made on the CPU
first and carried.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cadence.bench import frontier, report
from cadence.bench.runner import BenchSettings, default_prompts, format_table, run_bench
from cadence.recipe import Recipe
from cadence.reference.models import REFERENCE_MODELS

POLICIES = ["fixed-interval", "fixed-interval(cfg_reuse=true)", "first-blocks", "taylorseer(order=2)", "teacache",
            "magcache", "ertacache", "block-delta"]
BUDGETS = [0.25, 0.4, 0.5, 0.65]
PEERS = [
    # diffusers 0.42 hooks: the docs' setting (the config defaults) and a sweep around it
    *(f"diffusers-fbcache(threshold={t})" for t in (0.05, 0.1, 0.2, 0.3, 0.45, 0.6)),
    *(f"diffusers-magcache(threshold={t})" for t in (0.06, 0.12, 0.24, 0.5)),
    *(f"diffusers-taylorseer(cache_interval={n})" for n in (2, 3, 4, 5)),
    "diffusers-taylorseer(cache_interval=3, modules='attention+ffn')",
    *(f"diffusers-pab(spatial_skip_range={n})" for n in (2, 3, 4)),
    "diffusers-pab(spatial_skip_range=2, per_branch=true)",
    "diffusers-fastercache", "diffusers-fastercache(spatial_skip_range=3)",
]


def with_budget(policy: str, budget: float) -> str:
    if "(" in policy:
        return policy[:-1] + f", budget={budget})"
    return f"{policy}(budget={budget})"


def sweep_recipes(policies=POLICIES, budgets=BUDGETS, peers=PEERS) -> list[str]:
    return [with_budget(p, b) for p in policies for b in budgets] + list(peers)


def main(default_recipes=sweep_recipes, description=__doc__):
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ref-video", choices=list(REFERENCE_MODELS))
    parser.add_argument("--prompts", type=int, default=8, help="held-out prompts")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--x", choices=["ideal_speedup", "speedup"], default="ideal_speedup",
                        help="frontier x axis: ideal (work removed) or measured speedup")
    parser.add_argument("--recipes", nargs="*", default=None, help="default: the sweep's own list")
    parser.add_argument("--embeddings", type=Path, default=None, help="precomputed prompt embeddings")
    parser.add_argument("--prepare-embeddings", type=Path, default=None,
                        help="write the held-out prompts' embeddings of both models to this file and stop")
    parser.add_argument("--part", default="1/1", help="run the i-th of n interleaved parts of the recipe list (i/n)")
    parser.add_argument("--merge", type=Path, nargs="*", default=None,
                        help="combine the results.jsonl of these part folders into --out and stop")
    parser.add_argument("--out", type=Path, default=Path("sweep-out"))
    args = parser.parse_args()
    if args.merge:
        write_frontier(args.out, report.summarize(merge_rows(args.merge)), args)
        return
    if args.prepare_embeddings:
        from cadence.reference.text import save_prompt_embeddings

        prompts = [p for model in ("ref-video", "ref-image") for p in default_prompts(model, "heldout", args.prompts)]
        print(f"wrote {save_prompt_embeddings(prompts, args.prepare_embeddings)}")
        return

    index, parts = map(int, args.part.split("/"))
    # "{steps}" in a recipe: the run's steps (diffusers' MagCache must be told them)
    recipes = [Recipe.parse(r.replace("{steps}", str(args.steps)))
               for r in (args.recipes or default_recipes())][index - 1 :: parts]
    settings = BenchSettings(model=args.model, recipes=recipes, prompts=default_prompts(args.model, "heldout", args.prompts),
                             seeds=list(range(args.seeds)), out=args.out, steps=args.steps, device=args.device,
                             embeddings=args.embeddings)
    _, summary = run_bench(settings)
    print(format_table(summary))
    write_frontier(args.out, summary, args)


def merge_rows(folders: list[Path]) -> list[dict]:
    """Rows of several part folders (an interrupted part's results.partial.jsonl too); where
    a recipe, prompt and seed appear twice, the later folder's row wins (a re-run)."""
    merged: dict[tuple, dict] = {}
    for folder in folders:
        path = folder / "results.jsonl"
        path = path if path.is_file() else folder / "results.partial.jsonl"
        for line in path.read_text().splitlines():
            row = json.loads(line)
            key = (row["recipe"], row["prompt"], row["seed"])
            if row["recipe"] != "baseline" or key not in merged:
                merged[key] = row
    baseline = [row for row in merged.values() if row["recipe"] == "baseline"]
    return baseline + [row for row in merged.values() if row["recipe"] != "baseline"]


def write_frontier(out: Path, summary: list[dict], args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    frontier.plot_frontiers(out / "frontier.png", summary, x_key=args.x,
                            title=f"{args.model}: {args.prompts} held-out prompts x {args.seeds} seeds, {args.steps} steps")
    (out / "frontier.md").write_text(frontier.markdown(summary, x_key=args.x))
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(frontier.markdown(summary, x_key=args.x))


if __name__ == "__main__":
    main()
