"""The recipes a served model can be asked for, each with what the tree measured of it.

Nothing here is a figure of its own: every number is read from the files the benchmarks
wrote (benchmarks/RESULTS.md, "Composed recipes and regional compilation"):

- the family's default recipe and the sentence that supports it (``models/<family>.py``);
- for Wan-family models (ref-video, Wan2.1 checkpoints): the composed recipes' speedup at
  the Wan2.1-1.3B size (``results/composed/wan_composed*_h100_*.json``) and their fidelity on
  ref-video at 50 steps (``results/composed/ref-video-50/report.md``), the two measurements
  the family default was chosen from.

The result files live in the repository, not in the installed package: a server run from a
wheel lists the family defaults and their sentences only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from cadence.models.family import find_family
from cadence.recipe import Recipe

COMPOSED = Path(__file__).resolve().parents[3] / "benchmarks" / "results" / "composed"
REAL_SIZE = "Wan2.1-1.3B size, 480p x 81 frames, 50 steps with CFG, random weights, bf16"
MEASURED_FAMILIES = ("wan",)  # the families the composed tables measured


def canonical(recipe: str) -> str | None:
    """A recipe string in the one form ``Recipe`` prints, or None if it does not parse here."""
    try:
        return str(Recipe.parse(recipe))
    except (ValueError, TypeError):
        return None


def _real_size(directory: Path) -> dict[str, dict]:
    """recipe -> its speedup at the real size, from every composed run recorded."""
    found = {}
    for path in sorted(directory.glob("wan_composed*_h100_*.json")):
        data = json.loads(path.read_text())
        rows, meta = (data, {}) if isinstance(data, list) else (data.get("results", []), data.get("meta", {}))
        date = re.search(r"\d{4}-\d{2}-\d{2}", path.name)
        device = meta.get("device", "NVIDIA H100 80GB HBM3" if "h100" in path.name else "GPU")
        for row in rows:
            recipe = canonical(row["recipe"])
            if recipe and recipe != "baseline" and recipe not in found:
                found[recipe] = {"speedup": round(row["speedup"], 2), "seconds": round(row["seconds"], 2),
                                 "where": f"{REAL_SIZE}, {device}, {date.group() if date else ''}".rstrip(", "),
                                 "source": str(path.relative_to(directory.parents[2]))}
    return found


def _report_rows(report: Path) -> tuple[dict, list[dict]]:
    """A bench report.md -> (its header fields, its results table as dicts)."""
    header, rows, columns = {}, [], None
    for line in report.read_text().splitlines():
        field = re.match(r"- \*\*(\w[\w ]*)\*\*: (.*)", line)
        if field:
            header[field.group(1).lower()] = field.group(2).strip()
        elif line.startswith("|") and columns is None:
            columns = [cell.strip() for cell in line.strip("|").split("|")]
        elif line.startswith("|") and not line.startswith("|---"):
            cells = [cell.strip().strip("`") for cell in line.strip("|").split("|")]
            rows.append(dict(zip(columns, cells)))
        elif not line.startswith("|") and columns is not None and rows:
            break
    return header, rows


def _fidelity(directory: Path) -> dict[str, dict]:
    """recipe -> its PSNR and SSIM on ref-video (and its speedup there), from the 50-step run."""
    report = directory / "ref-video-50" / "report.md"
    if not report.is_file():
        return {}
    header, rows = _report_rows(report)
    where = f"ref-video, {header.get('steps', '?')} steps, against its unaccelerated output; " \
            f"{header.get('device', '?')}, {header.get('date', '?')}"
    found = {}
    for row in rows:
        recipe = canonical(row.get("recipe", ""))
        if not recipe or recipe == "baseline":
            continue
        try:
            found[recipe] = {"psnr_db": float(row["PSNR mean (dB)"]), "ssim": float(row["SSIM mean"]),
                             "speedup_on_reference": float(row["speedup"].rstrip("x")), "where": where,
                             "source": str(report.relative_to(directory.parents[2]))}
        except (KeyError, ValueError):
            continue
    return found


def recipes_for(model: str, transformer_class: str, directory: Path = COMPOSED) -> list[dict]:
    """The recipes to offer for one served model: baseline, the family default first, then
    every recipe with a measurement for this family."""
    family = find_family(model) or find_family(transformer_class)
    entries = [{"recipe": "baseline", "default": False, "summary": "unaccelerated: the reference of every speedup "
                "and PSNR", "real_size": None, "fidelity": None}]
    if family is None:
        return entries
    default = canonical(family.recipe.recipe) or family.recipe.recipe
    measured = directory.is_dir() and family.name in MEASURED_FAMILIES
    real, fidelity = (_real_size(directory), _fidelity(directory)) if measured else ({}, {})
    names = [default] + [name for name in {**real, **fidelity} if name != default]
    for name in names:
        entries.append({"recipe": name, "default": name == default,
                        "summary": family.recipe.measured if name == default else None,
                        "needs": family.recipe.needs if name == default else None,
                        "real_size": real.get(name), "fidelity": fidelity.get(name)})
    return entries
