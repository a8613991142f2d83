"""Every ``cadence ...`` command that a message names works: it is a command, its options are
that command's options, and run as a user would copy it (placeholders filled in) it gets
through every check of its arguments up to loading the model. A message naming a command the
CLI then rejects (``--technique activations`` once was one) fails here."""

import ast
import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from conftest import tiny_pipe

import cadence
from cadence.accel.registry import calibrations, load_builtin
from cadence.cli import main

SRC = Path(cadence.__file__).parent
# What a message may write in place of a value: filled in with one a user could give.
PLACEHOLDERS = {"MODEL": "ref-image", "DIR": "ref-image", "M": "ref-image", "FAMILY": "wan", "PATH": "x.json"}
COMMAND = re.compile(r"cadence ((?:generate|bench|train|calibrate|quantize|recipes|demo)(?=[\s`]|$)[^`\"\n]*)")


class _Loaded(Exception):
    """Raised in place of loading a model: every argument check came before it."""


def _commands_in_source() -> list[tuple[str, str]]:
    """(file:line, command) for every `cadence ...` in a string of the package, f-string
    fields written as {name}."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        parts = {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for part in node.values}
        for node in ast.walk(tree):
            if id(node) in parts:  # read with its f-string
                continue
            if isinstance(node, ast.JoinedStr):
                text = "".join(part.value if isinstance(part, ast.Constant) else "{field}" for part in node.values)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value
            else:
                continue
            for match in COMMAND.finditer(text):
                found.append((f"{path.relative_to(SRC)}:{node.lineno}", match.group(1).strip().rstrip(".,;:)")))
    return sorted(set(found))


SOURCE_COMMANDS = _commands_in_source()


def _options(command: click.Command) -> set[str]:
    return {name for param in command.params for name in getattr(param, "opts", []) + getattr(param, "secondary_opts", [])}


def test_the_scan_finds_the_commands_messages_name():
    named = {command.split()[0] for _, command in SOURCE_COMMANDS}
    assert {"calibrate", "train", "quantize", "recipes"} <= named, named


@pytest.mark.parametrize("where, command", SOURCE_COMMANDS, ids=[where for where, _ in SOURCE_COMMANDS])
def test_every_command_a_message_names_exists_with_those_options(where, command):
    name, *words = command.split()
    assert name in main.commands, f"{where}: `cadence {command}` names no command"
    valid = _options(main.commands[name])
    for word in words:
        if word.startswith("--"):
            assert word.split("=")[0] in valid, f"{where}: `cadence {command}`: {word} is not an option of {name}"


def _run_up_to_loading(command: str, monkeypatch) -> None:
    """Run ``cadence COMMAND`` as a user would, placeholders filled in, model loading stopped."""
    def stop(*args, **kwargs):
        raise _Loaded

    monkeypatch.setattr(cadence, "load", stop)
    args = [PLACEHOLDERS.get(word, word) for word in shlex.split(command)]
    result = CliRunner().invoke(main, args + ["--device", "cpu"])
    assert isinstance(result.exception, _Loaded), f"`cadence {command}` was refused:\n{result.output}"


# technique -> a recipe term of it that needs its calibration (every calibrated technique is listed:
# a new one fails test_every_calibrated_technique_is_exercised until it is added here).
NEEDS_CALIBRATION = {
    "teacache": "teacache", "magcache": "magcache", "ertacache": "ertacache", "diffusers-magcache": "diffusers-magcache",
    "int8": "int8", "fp8": "fp8(activations='static')", "nvfp4": "nvfp4(smooth=0.5)", "mxfp4": "mxfp4(smooth=0.5)",
    "mixed": "mixed",
}


def test_every_calibrated_technique_is_exercised():
    calibrated = {name for name, technique in load_builtin().items() if technique.calibration is not None}
    assert calibrated == set(NEEDS_CALIBRATION)


@pytest.mark.parametrize("term", NEEDS_CALIBRATION.values())
def test_the_command_an_uncalibrated_technique_names_runs(term, monkeypatch):
    pipe = tiny_pipe("image")
    with pytest.raises(ValueError) as refusal:
        with cadence.accelerate(pipe, term):
            from conftest import tiny_sample

            tiny_sample(pipe, "image", steps=2)
    commands = re.findall(r"`cadence ([^`]*)`", str(refusal.value))
    assert commands, f"{term}: the refusal names no command to run: {refusal.value}"
    for command in commands:
        _run_up_to_loading(command, monkeypatch)


def test_the_calibration_store_names_take_the_calibrate_command(monkeypatch):
    for store in {calibration.store for calibration in calibrations().values()}:
        _run_up_to_loading(f"calibrate --model ref-image --technique {store}", monkeypatch)


@pytest.mark.parametrize("family", ["wan", "flux", "ref-video"])
def test_the_command_a_default_recipe_needs_runs(family, monkeypatch):
    result = CliRunner().invoke(main, ["recipes", "--model", family])
    needs = re.search(r"needs: .*?cadence (calibrate[^(\n]*)", result.output)
    if needs is None:
        pytest.skip(f"{family}'s default recipe needs no command")
    _run_up_to_loading(needs.group(1).strip(), monkeypatch)
