"""Synthetic tasks whose answers are checked exactly: ref-dllm is trained on them and every
decoding recipe is scored on them (exact match per task).

Each task draws (prompt, answer) pairs from a ``random.Random``; the prompt ends with '=' and
the answer is what the model writes after it, then end-of-sequence tokens to the end of the
generation canvas (LLaDA's SFT convention, so a decoder learns to fill the tail with EOS).
Training draws from seeds >= 1,000; evaluation from seed 0 (``evaluation_set``), so the
scored prompts are draws the trainer never saw, apart from chance repeats of short ones.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

LETTERS = "abcdefghijklmnopqrstuvwxyz"
NAMES = ("ann", "bob", "cal", "dee", "eve", "fay", "gus", "hal")
ITEMS = ("pens", "cups", "eggs", "keys", "hats", "jars")


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


def addition(rng):
    a, b = _number(rng, rng.randint(1, 4)), _number(rng, rng.randint(1, 4))
    return f"{a}+{b}=", str(a + b)


def multiplication(rng):
    a, b = _number(rng, rng.randint(1, 3)), _number(rng, rng.randint(1, 2))
    return f"{a}*{b}=", str(a * b)


def sorting(rng):
    digits = [rng.choice("0123456789") for _ in range(rng.randint(3, 8))]
    return f"sort:{' '.join(digits)}=", " ".join(sorted(digits))


def copying(rng):
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 12)))
    return f"copy:{word}=", word


def reversal(rng):
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 12)))
    return f"rev:{word}=", word[::-1]


PAIRS = {"(": ")", "[": "]", "{": "}", "<": ">"}


def brackets(rng):
    """An unbalanced prefix (openers, some closed again); the answer closes what is open."""
    written, stack = [], []
    for _ in range(rng.randint(2, 10)):
        if stack and rng.random() < 0.35:
            written.append(PAIRS[stack.pop()])
        else:
            stack.append(rng.choice(tuple(PAIRS)))
            written.append(stack[-1])
    if not stack:
        stack.append(rng.choice(tuple(PAIRS)))
        written.append(stack[-1])
    return f"close:{''.join(written)}=", "".join(PAIRS[b] for b in reversed(stack))


def word_problem(rng):
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    have, change = rng.randint(2, 60), rng.randint(1, 40)
    if rng.random() < 0.5:
        return f"{name} has {have} {item} and gets {change} more. how many {item}?=", str(have + change)
    have += change  # never a negative count
    return f"{name} has {have} {item} and gives {change} away. how many {item}?=", str(have - change)


def retrieval(rng):
    """Key-value retrieval over a long context: 8 to 40 pairs (about 50 to 280 characters)."""
    count = rng.randint(8, 40)
    keys = rng.sample([a + b for a in LETTERS for b in LETTERS], count)
    values = [str(rng.randint(0, 999)) for _ in keys]
    asked = rng.randrange(count)
    context = ";".join(f"{k}:{v}" for k, v in zip(keys, values))
    return f"{context};?{keys[asked]}=", values[asked]


@dataclass(frozen=True)
class Task:
    name: str
    draw: Callable[[random.Random], tuple[str, str]]
    summary: str


TASKS: dict[str, Task] = {task.name: task for task in (
    Task("add", addition, "multi-digit addition, 1-4 digits each"),
    Task("mul", multiplication, "multiplication, 1-3 digits by 1-2 digits"),
    Task("sort", sorting, "sort 3-8 digits"),
    Task("copy", copying, "copy 3-12 letters"),
    Task("reverse", reversal, "reverse 3-12 letters"),
    Task("brackets", brackets, "close the open brackets of a prefix"),
    Task("word", word_problem, "templated word problems (add or take away)"),
    Task("retrieve", retrieval, "key-value retrieval over 8-40 pairs"),
)}
# The longest prompt and answer any task draws (characters): the trainer's canvas must hold them.
MAX_PROMPT, MAX_ANSWER = 290, 16


def check_tasks(names) -> list[str]:
    names = list(names)
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise ValueError(f"unknown task(s) {', '.join(map(repr, unknown)) or '(none given)'}; valid: {', '.join(TASKS)}")
    return names


def draw(rng: random.Random, names=None) -> tuple[str, str, str]:
    """(task, prompt, answer) from a task chosen uniformly among ``names`` (default: all)."""
    name = rng.choice(list(names or TASKS))
    prompt, answer = TASKS[name].draw(rng)
    return name, prompt, answer


def evaluation_set(task: str, count: int, seed: int = 0) -> list[tuple[str, str]]:
    """``count`` (prompt, answer) pairs of one task, the same for every recipe and run."""
    check_tasks([task])
    rng = random.Random(f"{task}-{seed}")
    return [TASKS[task].draw(rng) for _ in range(count)]
