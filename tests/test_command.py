"""The command a card or report records is the one a user would type again, however it was started."""

import sys

import pytest

from cadence.command import command_line


@pytest.mark.parametrize("argv, group, typed", [
    (["/usr/bin/cadence", "distill", "--teacher", "ref-video"], "distill", "cadence distill --teacher ref-video"),
    (["/x/cadence/distill/cli.py", "--teacher", "ref-video"], "distill", "cadence distill --teacher ref-video"),
    (["/usr/bin/cadence", "dllm", "train", "--out", "a b"], "dllm", "cadence dllm train --out 'a b'"),
    (["benchmarks/dllm_cli.py", "train", "--out", "x"], "dllm", "cadence dllm train --out x"),
    (["/usr/bin/cadence", "bench", "--model", "ref-dllm"], "dllm", "cadence bench --model ref-dllm"),
    (["/x/cadence/cli.py", "tune", "--model", "ref-video"], "", "cadence tune --model ref-video"),
])
def test_the_command_is_recorded_as_typed(monkeypatch, argv, group, typed):
    monkeypatch.setattr(sys, "argv", argv)
    assert command_line(group) == typed
