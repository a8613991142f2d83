"""The quality bars: what a candidate is measured on, and how a bar is met.

PSNR (and SSIM when asked) compare a candidate's output with the unaccelerated output of
the same prompt and seed (bench/metrics.py). Adherence is read by the judge
(``cadence.judge``): ``--min-adherence`` is accepted only where that package is installed
and its weights load; the hook is ``reader()``, one function (output, prompt) -> the share
of the caption's attributes the judge reads back (``cadence.judge.score.adherence``), so
the judge is called in one place.

Each bar has a margin, used twice: a candidate whose first cases miss the bar by more is
rejected early, and the chosen recipe must meet the bar within it on the held-out prompts.
The confirmation before the choice asks for the bar itself.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

# Per-prompt PSNR of one recipe spreads by about this much around its mean (bench reports on
# the reference models), so one prompt's miss by less says little about the mean.
PSNR_MARGIN_DB = 1.0
SSIM_MARGIN = 0.01
ADHERENCE_MARGIN = 0.05
JUDGE = "cadence.judge"


@dataclass(frozen=True)
class Measure:
    name: str
    bar: float
    margin: float
    read: Callable[[dict, tuple[str, int]], float]  # (a run's row, its case) -> value; higher is better
    unit: str = ""

    def show(self, value: float) -> str:
        return f"{self.name} {value:.2f}{self.unit}" if self.unit else f"{self.name} {value:.3f}"


def check_adherence(bar: float | None) -> None:
    if bar is None:
        return
    if importlib.util.find_spec(JUDGE) is None:
        raise ValueError(f"--min-adherence {bar} needs the judge ({JUDGE}), which this installation does not have; "
                         "leave --min-adherence out (PSNR and SSIM bars work without it)")
    if not 0 < bar <= 1:
        raise ValueError(f"--min-adherence {bar} must be in (0, 1]: the share of caption attributes read back")
    try:
        reader()
    except (ImportError, AttributeError, OSError, ValueError, FileNotFoundError) as error:
        raise ValueError(f"--min-adherence {bar}: the judge cannot be loaded ({type(error).__name__}: {error}); "
                         "leave --min-adherence out") from None


def reader() -> Callable[[object, str], float]:
    """(output pixels, prompt) -> adherence, read by the judge (loaded once)."""
    checkpoint = importlib.import_module(f"{JUDGE}.checkpoint")
    score = importlib.import_module(f"{JUDGE}.score")
    judge = checkpoint.load()
    return lambda output, prompt: float(score.adherence([output], [prompt], judge)["adherence"])


def measures(settings) -> list[Measure]:
    """PSNR first (the pruner watches it), then the other bars asked for."""
    found = [Measure("PSNR", settings.min_psnr, PSNR_MARGIN_DB, lambda row, case: row["psnr"], " dB")]
    if settings.min_ssim is not None:
        found.append(Measure("SSIM", settings.min_ssim, SSIM_MARGIN, lambda row, case: row["ssim"]))
    if settings.min_adherence is not None:
        adherence = reader()
        found.append(Measure("adherence", settings.min_adherence, ADHERENCE_MARGIN,
                             lambda row, case: adherence(row["output"], case[0])))
    return found


def evaluate(found: list[Measure], row: dict, case: tuple[str, int]) -> dict[str, float]:
    return {m.name: m.read(row, case) for m in found}


def means(found: list[Measure], rows: list[dict]) -> dict[str, float]:
    return {m.name: sum(r["values"][m.name] for r in rows) / len(rows) for m in found}


def constraints(found: list[Measure], rows: list[dict]) -> list[float]:
    """Optuna's constraints: bar minus mean, feasible when every one is <= 0."""
    averaged = means(found, rows)
    return [m.bar - averaged[m.name] for m in found]


def misses(found: list[Measure], rows: list[dict]) -> bool:
    averaged = means(found, rows)
    return any(averaged[m.name] < m.bar - m.margin for m in found)


def meets(found: list[Measure], averaged: dict[str, float], *, within_margin: bool = True) -> bool:
    """Each bar met, or within its margin (the held-out check)."""
    return all(averaged[m.name] >= m.bar - (m.margin if within_margin else 0.0) for m in found)


def summary(found: list[Measure], rows: list[dict]) -> str:
    return describe(found, means(found, rows))


def describe(found: list[Measure], averaged: dict[str, float]) -> str:
    return ", ".join(m.show(averaged[m.name]) for m in found)


def bars(found: list[Measure]) -> str:
    return " and ".join(f"{m.name} >= {m.bar:g}{m.unit}" for m in found)
