"""What a tuning run leaves in OUT: recipe.txt and recipe.toml (the chosen recipe),
report.md (the settings, the measured frontier, the confirmation of the fastest candidates,
every rejected candidate with its reason, the held-out check), frontier.png and check.json
(the confirmation and the check). study.db and baselines/ are written as
the run goes. With --speed-at every speed in them is modelled at the real size, and the
report says so wherever one is given, beside the per-step times measured there."""

from __future__ import annotations

import json
import math
import os
from datetime import date
from pathlib import Path

import optuna
import torch

from cadence.tune import quality
from cadence.tune.check import holds

FRONTIER_PLOT = "frontier.png"


def write_outputs(result, settings, measures, load_before: float | None) -> None:
    out = settings.out
    if result.recipe is not None:
        (out / "recipe.txt").write_text(f"{result.recipe}\n")
        (out / "recipe.toml").write_text(result.recipe.to_toml())
    if result.check is not None or result.confirmations:
        (out / "check.json").write_text(json.dumps({"confirmation": result.confirmations, "check": result.check},
                                                   indent=1) + "\n")
    rows = _rows(result.trials)
    chosen = result.best.get("number") if result.recipe is not None else None
    plot_frontier(out / FRONTIER_PLOT, rows, measures[0].bar, chosen, _modelled(result))
    (out / "report.md").write_text(_report(result, settings, measures, rows, load_before))


def _rows(trials) -> list[dict]:
    """One row per candidate: its recipe, state, time, quality and why it was rejected."""
    rows = []
    for trial in trials:
        attrs = trial.user_attrs
        state = trial.state.name.lower()
        rows.append({"number": trial.number, "recipe": attrs.get("recipe", "?"), "state": state,
                     "relative_time": attrs.get("relative_time"), "quality": attrs.get("quality"),
                     "cases": len(attrs.get("seconds", [])), "feasible": state == "complete" and
                     all(c <= 0 for c in attrs.get("constraints", [1.0])),
                     "rejected": attrs.get("rejected") or trial.system_attrs.get("fail_reason")})
    return rows


def pareto(rows: list[dict]) -> list[dict]:
    """The complete candidates no other beats on both time and PSNR."""
    done = [r for r in rows if r["state"] == "complete" and r["relative_time"] and r["quality"]]
    front = [r for r in done if not any(o["relative_time"] <= r["relative_time"] and o["quality"]["PSNR"] >=
                                        r["quality"]["PSNR"] and o is not r and
                                        (o["relative_time"], o["quality"]["PSNR"]) !=
                                        (r["relative_time"], r["quality"]["PSNR"]) for o in done)]
    return sorted(front, key=lambda r: r["relative_time"])


def _modelled(result) -> str:
    """What a speed in the report is, with --speed-at ('' without)."""
    return f"modelled at {result.speed_at} from measured per-step times" if result.speed_at else ""


def _speedup(result) -> str:
    return f"speedup ({_modelled(result)})" if result.speed_at else "speedup"


def plot_frontier(path: Path, rows: list[dict], bar: float, chosen: int | None = None, modelled: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"complete": ("o", "tab:blue", "measured on every tuning case"),
              "pruned": ("x", "tab:gray", "rejected early (first cases only)")}
    for state, (marker, colour, label) in styles.items():
        points = [(1 / r["relative_time"], _finite(r["quality"]["PSNR"])) for r in rows
                  if r["state"] == state and r["relative_time"] and r["quality"]]
        if points:
            ax.scatter(*zip(*points), marker=marker, color=colour, label=label)
    front = pareto(rows)
    if front:
        ax.plot([1 / r["relative_time"] for r in front], [_finite(r["quality"]["PSNR"]) for r in front],
                color="tab:orange", label="frontier")
    picked = [r for r in rows if r["number"] == chosen and r["relative_time"] and r["quality"]]
    if picked:
        ax.scatter([1 / picked[0]["relative_time"]], [_finite(picked[0]["quality"]["PSNR"])], marker="*", s=200,
                   color="tab:green", label="chosen", zorder=3)
    ax.axhline(bar, color="tab:red", linestyle="--", label=f"bar {bar:g} dB")
    ax.set_xlabel(f"speedup over the baseline ({modelled or 'measured in the same trial'})")
    ax.set_ylabel("PSNR against the baseline (dB)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _confirm_cases(split) -> str:
    if split.confirm:
        return f"{len(split.confirm)} other prompts x the same seeds"
    return "the tuning cases again (no prompt left for them)"


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 99.0  # identical outputs: drawn at the top


def _fmt_quality(values: dict | None) -> str:
    if not values:
        return "-"
    return ", ".join(f"{k} {'inf' if not math.isfinite(v) else f'{v:.2f}' if k == 'PSNR' else f'{v:.3f}'}"
                     for k, v in values.items())


def _speed_at_lines(result) -> list[str]:
    """With --speed-at: how speeds were modelled, and the per-step times measured at the real size."""
    if not result.speed_at:
        return []
    from cadence.tune import realsize

    spec = realsize.spec(result.speed_at)
    lines = ["", f"## Speed at {result.speed_at}", "",
             (f"Every speedup below is {_modelled(result)}: {spec.described or spec.transformer_cls.__name__}, random "
              f"weights in bf16, through the reference pipeline with random text embeddings of the real length. Per "
              f"per-forward part of a candidate (its techniques other than the step policy), one untimed warm-up "
              f"generation, then {realsize.SPEED_STEPS} steps with CFG timed. A candidate's time relative to the "
              "baseline is its part's per-step time times the share of the block work its step policy computed on "
              "this model's cases, over the baseline's per-step time; the reused forwards' own cost and the "
              "non-block work are left out. Quality is measured on this model."), "",
             "| part | ms per step | warm-up (s) |", "|---|---:|---:|"]
    lines += [f"| `{p.part or 'baseline'}` | {1000 * p.per_step_seconds:.1f} | {p.warm_up_seconds:.1f} |"
              for p in result.part_times]
    return lines


def _report(result, settings, measures, rows, load_before) -> str:
    device = torch.cuda.get_device_name() if settings.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    load = ""
    if load_before is not None and not settings.device.startswith("cuda"):
        load = f"; load average {load_before:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"
    lines = [f"# cadence tune: {settings.model or 'pipeline'}", "",
             f"- bar: {quality.bars(measures)}; {settings.steps} steps, guidance {settings.guidance_scale}",
             (f"- device: {device}, torch {torch.__version__}, optuna {optuna.__version__}, "
              f"{date.today().isoformat()}{load}"),
             f"- time budget {settings.time_budget:.0f} s; one baseline generation {result.baseline_seconds:.1f} s",
             (f"- tuning cases: {len(result.split.tuning)} prompts x seeds {list(result.split.tuning_seeds)}; "
              f"confirmation cases: {_confirm_cases(result.split)}; "
              f"check cases: {len(result.split.check)} other prompts x seeds {list(result.split.check_seeds)}"),
             f"- command: `{settings.command}`" if settings.command else "",
             *_speed_at_lines(result), "",
             "## Search space (from the technique registry)", "", result.space.describe(), ""]
    lines += [f"- note: {note}" for note in result.notes] + [""]
    if result.recipe is not None:
        best = result.best
        confirmed = best["confirmation"]
        added = f", with {', '.join(result.space.late)} added at the confirmation" if best.get("late_added") else ""
        modelled = f" ({_modelled(result)})" if result.speed_at else ""
        lines += ["## Chosen", "", (f"`{result.recipe}` (trial {best['number']}{added}): {1 / best['relative_time']:.2f}x "
                                    f"speedup{modelled} and {_fmt_quality(best.get('quality'))} on the tuning cases"
                                    f"{' (without it)' if added else ''}; {confirmed['speedup']:.2f}x and "
                                    f"{_fmt_quality(confirmed['quality'])} on the confirmation cases"), ""]
    else:
        lines += ["## No candidate held on the confirmation cases" if result.confirmations else
                  "## No candidate met the bar", ""]
        if result.best and result.best.get("quality"):
            where = " on the confirmation cases" if result.best.get("confirmed") else ""
            lines += [f"Nearest: `{result.best['recipe']}`, {_fmt_quality(result.best['quality'])}{where}", ""]
    if result.confirmations:
        header = (f"| trial | recipe | search: {_speedup(result)} | search: quality | confirmed: {_speedup(result)} | "
                  "confirmed: quality | holds |")
        lines += ["## Confirmation (the fastest candidates meeting the bars, run again on cases the search never saw)",
                  "", header, "|---:|---|---:|---|---:|---|---|"]
        for entry in result.confirmations:
            speed = f"{entry['speedup']:.2f}x" if entry["speedup"] else entry.get("failed") or "-"
            held = holds(measures, entry)
            lines.append(f"| {entry['number']} | `{entry['recipe']}` | {entry['search_speedup']:.2f}x | "
                         f"{_fmt_quality(entry['search_quality'])} | {speed} | {_fmt_quality(entry['quality'])} | "
                         f"{'yes' if held else 'no'} |")
        lines += ["", ("The fastest that holds (every bar met on the confirmation cases, faster than the baseline) is "
                       "chosen; each confirmation case runs the baseline, then each candidate, timed against it" +
                       (f"; the speedups are {_modelled(result)}." if result.speed_at else ".")), ""]
    if result.check is not None:
        lines += ["## Held-out check (prompts and seeds never used for tuning)", "",
                  f"| recipe | {_speedup(result)} | quality | per case |", "|---|---:|---|---|"]
        for name, entry in result.check["recipes"].items():
            speed = f"{entry['speedup']:.2f}x" if entry["speedup"] else entry.get("failed") or "-"
            cases = "; ".join(_fmt_quality(c) for c in entry["per_case"])
            lines.append(f"| {name}: `{entry['recipe']}` | {speed} | {_fmt_quality(entry['quality'])} | {cases} |")
        verdict = "meets" if result.check["meets_bar_within_margin"] else "does NOT meet"
        margins = ", ".join(f"{k} {v:g}" for k, v in result.check["margins"].items())
        lines += ["", f"The tuned recipe {verdict} the bar on the check cases within its margin ({margins}).",
                  "Each check case runs the baseline, then each recipe, timed against that baseline" +
                  (f" (the speedups above are {_modelled(result)}, the shipped default's too)." if result.speed_at
                   else "."), ""]
    lines += ["## Frontier", "", f"![speedup against PSNR]({FRONTIER_PLOT})", "",
              f"| trial | recipe | {_speedup(result)} | quality |", "|---:|---|---:|---|"]
    for row in pareto(rows):
        lines.append(f"| {row['number']} | `{row['recipe']}` | {1 / row['relative_time']:.2f}x | "
                     f"{_fmt_quality(row['quality'])} |")
    lines += ["", "## Every candidate", "", (f"| trial | recipe | state | {_speedup(result)} | quality (cases) | "
              "rejected because |"),
              "|---:|---|---|---:|---|---|"]
    for row in rows:
        speed = f"{1 / row['relative_time']:.2f}x" if row["relative_time"] else "-"
        why = row["rejected"] or ("" if row["feasible"] else "misses the bar" if row["state"] == "complete" else "")
        lines.append(f"| {row['number']} | `{row['recipe']}` | {row['state']} | {speed} | "
                     f"{_fmt_quality(row['quality'])} ({row['cases']}) | {why} |")
    return "\n".join(lines) + "\n"
