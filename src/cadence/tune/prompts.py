"""Which prompts tune and which check: two disjoint sets, fixed before anything runs.

The candidates are scored on the *tuning* cases only; the chosen recipe is then checked on
*check* cases that no candidate ever saw: other prompts and other seeds. For the reference
models both come from the held-out captions (never trained on): the first ``tuning`` of
them tune, the next ``check`` of them check. A prompt file is split the same way, its last
quarter (at least one prompt) kept for the check. Calibrations use the training captions
(``reference.data.train_captions``), which are neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cadence.reference import data


@dataclass(frozen=True)
class PromptSplit:
    tuning: tuple[str, ...]
    check: tuple[str, ...]
    tuning_seeds: tuple[int, ...]
    check_seeds: tuple[int, ...]

    def __post_init__(self):
        shared = set(self.tuning) & set(self.check)
        if shared:
            raise ValueError(f"a prompt is both a tuning and a check prompt: {min(shared)!r}")
        if set(self.tuning_seeds) & set(self.check_seeds):
            raise ValueError(f"tuning seeds {self.tuning_seeds} and check seeds {self.check_seeds} overlap")
        if not self.tuning or not self.check:
            raise ValueError(f"need at least one tuning and one check prompt, got {len(self.tuning)} and "
                             f"{len(self.check)}")

    @property
    def tuning_cases(self) -> list[tuple[str, int]]:
        return [(prompt, seed) for prompt in self.tuning for seed in self.tuning_seeds]

    @property
    def check_cases(self) -> list[tuple[str, int]]:
        return [(prompt, seed) for prompt in self.check for seed in self.check_seeds]


def split_prompts(source: str | list[str], *, video: bool, tuning: int, check: int, seeds: int) -> PromptSplit:
    """``source``: ``heldout`` (the reference models' held-out captions), a prompt file (one a
    line) or a list of prompts. Seeds ``0..seeds-1`` tune, ``seeds..2*seeds-1`` check."""
    for name, value in (("tuning prompts", tuning), ("check prompts", check), ("seeds", seeds)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if source == "heldout":
        prompts = data.heldout_prompts(tuning + check, video=video)
        tuned, checked = prompts[:tuning], prompts[tuning:]
    else:
        prompts = _read(source)
        if len(prompts) < 2:
            raise ValueError(f"--prompts {source!r} holds {len(prompts)} prompt(s): tuning needs at least 2 (one to tune "
                             "on, one to check the result on)")
        held = max(1, len(prompts) // 4)
        tuned, checked = prompts[:-held][:tuning], prompts[-held:][:check]
    return PromptSplit(tuple(tuned), tuple(checked), tuple(range(seeds)), tuple(range(seeds, 2 * seeds)))


def _read(source: str | list[str]) -> list[str]:
    if isinstance(source, (list, tuple)):
        prompts = [p.strip() for p in source if p.strip()]
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"--prompts {source!r}: expected 'heldout' or a text file with one prompt per line")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return list(dict.fromkeys(prompts))  # a repeated prompt would land in both sets
