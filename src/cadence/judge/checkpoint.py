"""The judge's committed weights: saved and loaded with safetensors, checked before use."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cadence.judge.model import Judge

WEIGHTS = Path(__file__).parent / "weights" / "judge.safetensors"
_MADE_BY = "python -m cadence.judge.train"


def save(judge: Judge, path: Path, metadata: dict) -> Path:
    state = {name: value.detach().cpu().contiguous() for name, value in judge.state_dict().items()}
    save_file(state, str(path), metadata={key: json.dumps(value) for key, value in metadata.items()})
    return path


def _refuse(path: Path, why: str) -> ValueError:
    return ValueError(f"judge checkpoint {str(path)!r} {why}; expected the safetensors file written by {_MADE_BY} "
                      f"(the shipped one is {WEIGHTS})")


def check(path: Path | str = WEIGHTS) -> dict[str, torch.Tensor]:
    """-> the state dict, or ValueError naming the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise _refuse(path, "does not exist")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise _refuse(path, f"is damaged ({error})") from None
    expected = Judge().state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise _refuse(path, f"does not hold the judge's tensors (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, value in state.items():
        if value.shape != expected[name].shape:
            raise _refuse(path, f"has {name} of shape {tuple(value.shape)}, the judge needs {tuple(expected[name].shape)}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise _refuse(path, f"has NaN or Inf in {name}")
    return state


def load(path: Path | str = WEIGHTS, device="cpu") -> Judge:
    """The judge in eval mode; a damaged or foreign file is refused before the model is built."""
    state = check(path)
    judge = Judge()
    judge.load_state_dict(state)
    return judge.eval().to(device)
