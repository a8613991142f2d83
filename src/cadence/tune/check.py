"""Recipes run side by side on cases, each timed against the baseline run just before it:
the confirmation of the fastest candidates and the held-out check of the chosen recipe.

Per case the baseline runs first, then each recipe, and each recipe's speedup is taken
against that case's baseline, so a load that changes between cases on a shared machine
moves the baseline and the recipes together.

With ``modelled`` (``cadence tune --speed-at``) a recipe's speedup is its modelled one at the
real size (``realsize.SpeedAt.relative_time``, from its compute share measured on these
cases), and the speedup measured here on the tuned model is kept as ``measured_speedup``.
"""

from __future__ import annotations

from collections.abc import Callable

from cadence.recipe import Recipe
from cadence.tune import quality
from cadence.tune.evaluate import FAILURES, Evaluator

# (recipe, its computed share) -> its modelled time relative to the baseline's
Modelled = Callable[[Recipe, float], float]


def compare(evaluator: Evaluator, measures: list[quality.Measure], cases: list[tuple[str, int]],
            recipes: dict[str, Recipe], modelled: Modelled | None = None) -> dict[str, dict]:
    """name -> {recipe, failed, speedup, quality (means), per_case, computed_share} of each
    recipe on ``cases`` (and measured_speedup, with ``modelled``)."""
    for recipe in recipes.values():
        evaluator.warm_up(recipe, cases[0])
    rows: dict[str, list[dict]] = {name: [] for name in recipes}
    failures: dict[str, str] = {}
    for case in cases:
        baseline = evaluator.time_baseline(case)
        for name, recipe in recipes.items():
            if name in failures:
                continue
            try:
                row = evaluator.run(recipe, case)
            except FAILURES as error:
                failures[name] = f"{type(error).__name__}: {error}"
                continue
            row["values"] = quality.evaluate(measures, row, case)
            row["baseline_seconds"] = baseline
            row.pop("output")
            rows[name].append(row)
    found = {name: _summary(recipe, rows[name], failures.get(name), measures) for name, recipe in recipes.items()}
    if modelled is not None:
        for name, entry in found.items():
            entry["measured_speedup"] = entry["speedup"]
            if entry["speedup"] is None:
                continue
            try:
                entry["speedup"] = 1 / modelled(recipes[name], entry["computed_share"])
            except FAILURES as error:  # the per-forward part cannot run at the real size
                entry["speedup"], entry["failed"] = None, f"at the real size: {type(error).__name__}: {error}"
    return found


def holds(measures: list[quality.Measure], confirmed: dict) -> bool:
    """A confirmed candidate (``compare``'s entry): every bar met, no margin, and a speedup
    over 1: against the baseline timed beside it or, with ``modelled`` (--speed-at), its
    modelled speedup at the real size."""
    return (confirmed["quality"] is not None and confirmed["speedup"] is not None and confirmed["speedup"] > 1.0 and
            quality.meets(measures, confirmed["quality"], within_margin=False))


def held_out_check(evaluator: Evaluator, measures: list[quality.Measure], cases: list[tuple[str, int]],
                   tuned: Recipe, default: Recipe | None, notes: list[str], modelled: Modelled | None = None) -> dict:
    """The chosen recipe, beside the family's shipped default, on cases (prompts and seeds)
    that no candidate was scored or chosen on."""
    recipes = {"tuned": tuned}
    if default is not None and str(default) == str(tuned):
        notes.append("the tuned recipe is the shipped default: the held-out check runs it once")
    elif default is not None:
        try:
            recipes["shipped default"] = evaluator.prepare(default)
        except FAILURES as error:
            notes.append(f"shipped default {default} could not run: {error}")
    summary = compare(evaluator, measures, cases, recipes, modelled)
    met = summary["tuned"]["quality"] is not None and quality.meets(measures, summary["tuned"]["quality"])
    return {"cases": len(cases), "recipes": summary, "meets_bar_within_margin": met,
            "margins": {m.name: m.margin for m in measures}}


def _summary(recipe: Recipe, done: list[dict], failed: str | None, measures) -> dict:
    baseline = sum(r["baseline_seconds"] for r in done)
    return {"recipe": str(recipe), "failed": failed,
            "speedup": baseline / sum(r["seconds"] for r in done) if done else None,
            "quality": quality.means(measures, done) if done else None,
            "per_case": [r["values"] for r in done], "computed_share": computed_share(done) if done else None}


def computed_share(rows: list[dict]) -> float:
    """The mean share of the block work computed over ``rows`` (1.0 where no step policy ran)."""
    return sum(1.0 if r["compute_fraction"] is None else r["compute_fraction"] for r in rows) / len(rows)
