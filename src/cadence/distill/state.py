"""A distillation run's state on disk, so that a killed run resumes with nothing lost.

``state/state.safetensors`` holds every tensor (student, critic, both optimizers' moments,
the RNG states); ``state/state.json`` the rest (settings, teacher, step, elapsed seconds, loss
history, judge evaluations, the optimizers' hyperparameters). Safetensors, not torch.save:
``cadence.load`` refuses pickle files anywhere in a checkpoint folder, and the run's folder is
one. Both files are written to a temporary name and moved into place, so a kill while saving
leaves the previous state whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE = "state"


def folder(out: Path) -> Path:
    return Path(out) / STATE


def exists(out: Path) -> bool:
    return (folder(out) / "state.json").is_file() and (folder(out) / "state.safetensors").is_file()


def read_record(out: Path) -> dict:
    return json.loads((folder(out) / "state.json").read_text())


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


def save(
    out: Path,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    generators: dict[str, torch.Generator],
    record: dict,
) -> None:
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
    save_file(tensors, str(target / "state.safetensors.partial"))
    (target / "state.json.partial").write_text(json.dumps({**record, "optimizer_groups": groups}, indent=1))
    os.replace(target / "state.safetensors.partial", target / "state.safetensors")
    os.replace(target / "state.json.partial", target / "state.json")


def load(
    out: Path,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    generators: dict[str, torch.Generator],
) -> dict:
    """Restore modules, optimizers and RNGs in place; -> the JSON record."""
    record = read_record(out)
    tensors = load_file(str(folder(out) / "state.safetensors"))
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
