"""Which prompts tune and which check: two disjoint sets, fixed before anything runs.

The candidates are scored on the *tuning* cases; the fastest of them that meet the bars are
run again on *confirmation* cases (other prompts, the same seeds) before one is chosen, so
that the luckiest of many candidates is not taken for the best (the search sees only the
tuning cases, the choice rests on cases the search never saw). The chosen recipe is then
checked on *check* cases that neither the search nor the choice saw: other prompts and other
seeds. For the reference models all three come from the held-out captions (never trained
on): the first ``tuning`` of them tune, the next ``confirm`` confirm, the next ``check``
check. A prompt file is split the same way: its last quarter (at least one prompt) kept for
the check, then up to a quarter of the rest for the confirmation (none when only one prompt
is left: the fastest candidates are then confirmed on the tuning cases, timed again).
Calibrations use the training captions (``reference.data.train_captions``), which are none
of these.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from cadence.reference import data

SPLIT_SEED = 0


@dataclass(frozen=True)
class PromptSplit:
    tuning: tuple[str, ...]
    check: tuple[str, ...]
    tuning_seeds: tuple[int, ...]
    check_seeds: tuple[int, ...]
    confirm: tuple[str, ...] = ()

    def __post_init__(self):
        for one, other, names in ((self.tuning, self.check, "tuning and a check"),
                                  (self.confirm, self.tuning, "confirmation and a tuning"),
                                  (self.confirm, self.check, "confirmation and a check")):
            shared = set(one) & set(other)
            if shared:
                raise ValueError(f"a prompt is both a {names} prompt: {min(shared)!r}")
        if set(self.tuning_seeds) & set(self.check_seeds):
            raise ValueError(f"tuning seeds {self.tuning_seeds} and check seeds {self.check_seeds} overlap")
        if not self.tuning or not self.check:
            raise ValueError(f"need at least one tuning and one check prompt, got {len(self.tuning)} and "
                             f"{len(self.check)}")

    @property
    def tuning_cases(self) -> list[tuple[str, int]]:
        return [(prompt, seed) for prompt in self.tuning for seed in self.tuning_seeds]

    @property
    def confirm_cases(self) -> list[tuple[str, int]]:
        """Where the fastest candidates are confirmed: the confirmation prompts at the tuning
        seeds, or the tuning cases again when there are none."""
        return [(prompt, seed) for prompt in self.confirm for seed in self.tuning_seeds] or self.tuning_cases

    @property
    def check_cases(self) -> list[tuple[str, int]]:
        return [(prompt, seed) for prompt in self.check for seed in self.check_seeds]


def split_prompts(source: str | list[str], *, video: bool, tuning: int, check: int, seeds: int,
                  confirm: int = 0) -> PromptSplit:
    """``source``: ``heldout`` (the reference models' held-out captions), a prompt file (one a
    line) or a list of prompts. Seeds ``0..seeds-1`` tune and confirm, ``seeds..2*seeds-1`` check."""
    for name, value in (("tuning prompts", tuning), ("check prompts", check), ("seeds", seeds)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if not isinstance(confirm, int) or confirm < 0:
        raise ValueError(f"confirmation prompts={confirm!r} must be an integer >= 0")
    if source == "heldout":
        # shuffled (fixed seed): the held-out list opens with four single-object demo clips, and
        # tuning on them alone would score every candidate on easier prompts than it is checked on
        prompts = data.heldout_prompts(tuning + confirm + check, video=video)
        random.Random(SPLIT_SEED).shuffle(prompts)
        tuned, confirmed, checked = prompts[:tuning], prompts[tuning:tuning + confirm], prompts[tuning + confirm:]
    else:
        prompts = _read(source)
        if len(prompts) < 2:
            raise ValueError(f"--prompts {source!r} holds {len(prompts)} prompt(s): tuning needs at least 2 (one to tune "
                             "on, one to check the result on)")
        held = max(1, len(prompts) // 4)
        rest, checked = prompts[:-held], prompts[-held:][:check]
        kept = min(confirm, max(1, len(rest) // 4) if len(rest) > 1 else 0)  # a tuning prompt stays
        confirmed, tuned = rest[len(rest) - kept:], rest[:len(rest) - kept][:tuning]
    return PromptSplit(tuple(tuned), tuple(checked), tuple(range(seeds)), tuple(range(seeds, 2 * seeds)),
                       tuple(confirmed))


def _read(source: str | list[str]) -> list[str]:
    if isinstance(source, (list, tuple)):
        prompts = [p.strip() for p in source if p.strip()]
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"--prompts {source!r}: expected 'heldout' or a text file with one prompt per line")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return list(dict.fromkeys(prompts))  # a repeated prompt would land in both sets
