"""The command a run was started with, as a user would type it again (cards, reports, studies)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path


def command_line(group: str = "") -> str:
    """Under the ``cadence`` console script, what was typed. Started another way (``python -m
    cadence.cli tune ...``, ``python -m cadence.distill.cli ...``, benchmarks/dllm_cli.py on the
    GPU machine), ``cadence``, the ``group`` of commands this one belongs to (``"dllm"``,
    ``"distill"``) unless the arguments already start with it, and the arguments."""
    arguments = sys.argv[1:]
    if Path(sys.argv[0]).name == "cadence":
        return shlex.join(["cadence", *arguments])
    words = group.split()
    if arguments[: len(words)] == words:
        arguments = arguments[len(words):]
    return shlex.join(["cadence", *words, *arguments])
