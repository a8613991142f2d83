"""Sweeps: many settings of many techniques on one model, seen as speed/fidelity
frontiers, and whether cadence's frontier dominates each peer's.

A recipe's *technique* is its terms' names (``teacache(budget=0.4)`` -> teacache), each
with ``+cfg-reuse`` when that option is on; peers are the techniques whose name starts
with ``diffusers-``. The x axis is a speedup: the ideal one (1 / compute fraction) when
timings are not meaningful (a tiny model on a GPU is launch-bound), or the measured one.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

PEER_PREFIX = "diffusers-"


def technique_of(recipe: str) -> str:
    """The technique names of a recipe's terms, joined by " + " (a composed recipe is its
    own line on the frontier)."""
    terms, depth, start = [], 0, 0
    for i, char in enumerate(recipe + "+"):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "+" and depth == 0:
            terms.append(recipe[start:i].strip())
            start = i + 1
    names = []
    for term in terms:
        name = re.split(r"[( ]", term, maxsplit=1)[0]
        names.append(name + ("+cfg-reuse" if "cfg_reuse=true" in term else ""))
    return " + ".join(names)


def is_peer(technique: str) -> bool:
    return technique.startswith(PEER_PREFIX)


def _points(summary: list[dict], x_key: str, y_key: str) -> dict[str, list[tuple[float, float, str]]]:
    groups: dict[str, list[tuple[float, float, str]]] = {}
    for s in summary:
        x, y = s.get(x_key), s.get(y_key)
        if s["recipe"] == "baseline" or x is None or y is None or not math.isfinite(y):
            continue
        groups.setdefault(technique_of(s["recipe"]), []).append((x, y, s["recipe"]))
    return {name: sorted(points) for name, points in groups.items()}


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points no other point beats on both axes (faster and more faithful), by speed."""
    best, kept = -math.inf, []
    for point in sorted(points, key=lambda p: (-p[0], -p[1])):
        if point[1] > best:
            kept.append(point)
            best = point[1]
    return sorted(kept)


def dominance(summary: list[dict], x_key: str = "ideal_speedup", y_key: str = "psnr_mean") -> list[dict]:
    """For every peer setting: cadence's best fidelity among its settings at least as fast,
    and whether it is higher."""
    groups = _points(summary, x_key, y_key)
    ours = [p for name, points in groups.items() if not is_peer(name) for p in points]
    rows = []
    for name, points in groups.items():
        if not is_peer(name):
            continue
        for x, y, recipe in points:
            faster = [p for p in ours if p[0] >= x - 1e-9]
            best = max(faster, key=lambda p: p[1], default=None)
            rows.append({
                "peer": recipe, "speedup": x, "peer_value": y,
                "cadence": best[2] if best else None, "cadence_speedup": best[0] if best else None,
                "cadence_value": best[1] if best else None,
                "dominated": best is not None and best[1] > y,
            })
    return rows


def plot_frontiers(path, summary: list[dict], x_key: str = "ideal_speedup", title: str = "") -> Path:
    """Two panels (PSNR, SSIM) against speedup: one line per technique through its settings,
    peers dashed, each technique's Pareto points filled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    names = sorted({technique_of(s["recipe"]) for s in summary if s["recipe"] != "baseline"},
                   key=lambda n: (is_peer(n), n))
    colours = {name: plt.get_cmap("tab20")(i % 20) for i, name in enumerate(names)}
    for ax, (y_key, label) in zip(axes, [("psnr_mean", "PSNR vs unaccelerated (dB)"), ("ssim_mean", "SSIM")]):
        groups = _points(summary, x_key, y_key)
        for name in names:
            points = groups.get(name, [])
            if not points:
                continue
            style = dict(color=colours[name], linestyle="--" if is_peer(name) else "-",
                         marker="s" if is_peer(name) else "o", markersize=5, linewidth=1.5)
            ax.plot([p[0] for p in points], [p[1] for p in points], label=name, markerfacecolor="white", **style)
            front = pareto(points)
            ax.plot([p[0] for p in front], [p[1] for p in front], linestyle="none", marker=style["marker"],
                    color=colours[name], markersize=5)
        ax.set_xlabel("ideal speedup (1 / work fraction)" if x_key == "ideal_speedup" else "measured speedup")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8, ncol=2, loc="lower left")
    fig.suptitle(title or "Speed vs fidelity; up and right is better; dashed = diffusers' hooks (peers)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _number(value, spec: str) -> str:
    """A table cell; techniques that remove no counted work (quantization) report none."""
    return "-" if value is None else format(value, spec)


def markdown(summary: list[dict], x_key: str = "ideal_speedup") -> str:
    """Per-technique table (settings by speed) and the dominance table."""
    lines = ["| technique | setting | compute fraction | ideal | measured | PSNR (dB) | SSIM | Pareto |",
             "|---|---|---:|---:|---:|---:|---:|:-:|"]
    by_recipe = {s["recipe"]: s for s in summary}
    groups = _points(summary, x_key, "psnr_mean")
    for name in sorted(groups, key=lambda n: (is_peer(n), n)):
        front = {p[2] for p in pareto(groups[name])}
        for _, _, recipe in groups[name]:
            s = by_recipe[recipe]
            lines.append(
                f"| {name} | `{recipe}` | {_number(s['compute_fraction'], '.3f')} | {_number(s['ideal_speedup'], '.2f')}{'x' if s['ideal_speedup'] else ''} | "
                f"{s['speedup']:.2f}x | {s['psnr_mean']:.2f} | {s['ssim_mean']:.4f} | {'*' if recipe in front else ''} |"
            )
    rows = dominance(summary, x_key)
    if rows:
        lines += ["", "| peer setting | speedup | PSNR | cadence's best at least as fast | its speedup | its PSNR | "
                  "dominated |", "|---|---:|---:|---|---:|---:|:-:|"]
        for r in rows:
            ours = (f"`{r['cadence']}` | {r['cadence_speedup']:.2f}x | {r['cadence_value']:.2f}"
                    if r["cadence"] else "none as fast | | ")
            lines.append(f"| `{r['peer']}` | {r['speedup']:.2f}x | {r['peer_value']:.2f} | {ours} | "
                         f"{'yes' if r['dominated'] else '**no**'} |")
    return "\n".join(lines) + "\n"
