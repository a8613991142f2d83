"""A distillation run's state on disk, so that a killed run resumes with nothing lost.

``state/state-<step>.safetensors`` holds every tensor (student, critic, both optimizers'
moments, the RNG states); ``state/state.json`` the rest (settings, teacher, step, elapsed
seconds, loss history, judge evaluations, the optimizers' hyperparameters) and the name of its
tensor file. Safetensors, not torch.save: ``cadence.load`` refuses pickle files anywhere in a
checkpoint folder, and the run's folder is one.

The JSON is the single commit point. A save writes the tensors to a new file (its name carries
the step, never the name the current JSON points at), then writes the JSON to a temporary name
and moves it into place (``os.replace``: atomic), and only then deletes the older tensor files.
A kill before the move leaves the previous JSON naming the previous tensors, both whole (the
new file is an orphan the next save deletes); a kill after it leaves the new pair. Two separate
moves (tensors, then JSON) would not: a kill between them pairs new tensors with the old step
and history. Both files are fsynced before the move (the promise, and its test, are for a killed
process; the directory itself is not fsynced, so a power cut may lose the last commit, never mix
two).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE = "state"
RECORD = "state.json"
LEGACY_TENSORS = "state.safetensors"  # states written before the JSON named its tensor file


def folder(out: Path) -> Path:
    return Path(out) / STATE


def read_record(out: Path) -> dict:
    return json.loads((folder(out) / RECORD).read_text())


def tensors_path(out: Path) -> Path:
    """The tensor file the committed JSON names."""
    return folder(out) / read_record(out).get("tensors", LEGACY_TENSORS)


def exists(out: Path) -> bool:
    return (folder(out) / RECORD).is_file() and tensors_path(out).is_file()


def _optimizer_tensors(prefix: str, optimizer: torch.optim.Optimizer) -> tuple[dict, list]:
    saved = optimizer.state_dict()
    tensors = {
        f"{prefix}.{index}.{key}": value for index, values in saved["state"].items() for key, value in values.items()
    }
    return tensors, saved["param_groups"]


def _restore_optimizer(optimizer: torch.optim.Optimizer, prefix: str, tensors: dict, groups: list) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            index, key = name[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _new_tensors_name(target: Path, step: int) -> str:
    """``state-<step>.safetensors``, or with a suffix when that name is taken (a second save at
    the same step, e.g. the final one after a periodic one: the committed file is never
    overwritten in place)."""
    name, again = f"state-{step}.safetensors", 1
    while (target / name).exists():
        name, again = f"state-{step}-{again}.safetensors", again + 1
    return name


def _commit(target: Path, record: dict) -> None:
    """Write the JSON beside the tensors and move it into place: the moment the new state counts."""
    partial = target / (RECORD + ".partial")
    partial.write_text(json.dumps(record, indent=1))
    _fsync(partial)
    os.replace(partial, target / RECORD)


def save(
    out: Path,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    generators: dict[str, torch.Generator],
    record: dict,
) -> None:
    """Commit a state: tensors to a new file, then the JSON naming it, then drop older tensor files.
    ``record`` must hold ``step``."""
    tensors = {f"{name}.{key}": value for name, module in modules.items() for key, value in module.state_dict().items()}
    groups = {}
    for name, optimizer in optimizers.items():
        optimizer_tensors, groups[name] = _optimizer_tensors(f"optimizer.{name}", optimizer)
        tensors.update(optimizer_tensors)
    tensors.update({f"rng.{name}": generator.get_state() for name, generator in generators.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    tensors = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    target = folder(out)
    target.mkdir(parents=True, exist_ok=True)
    name = _new_tensors_name(target, record["step"])
    save_file(tensors, str(target / name))
    _fsync(target / name)
    _commit(target, {**record, "tensors": name, "optimizer_groups": groups})
    for stale in [*target.glob("state-*.safetensors"), target / LEGACY_TENSORS]:
        if stale.name != name:
            stale.unlink(missing_ok=True)


def load(
    out: Path,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    generators: dict[str, torch.Generator],
) -> dict:
    """Restore modules, optimizers and RNGs in place; -> the JSON record."""
    record = read_record(out)
    tensors = load_file(str(folder(out) / record.get("tensors", LEGACY_TENSORS)))
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict({key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)})
    for name, optimizer in optimizers.items():
        _restore_optimizer(optimizer, f"optimizer.{name}", tensors, record["optimizer_groups"][name])
    for name, generator in generators.items():
        generator.set_state(tensors[f"rng.{name}"])
    torch.set_rng_state(tensors["rng.torch"])
    return record


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path) + ".partial")
    os.replace(str(path) + ".partial", path)
