"""The calibration store that every calibrated technique shares.

A calibration is what a technique measures once on a model, with every step computed,
before it can run: TeaCache's polynomial, MagCache's magnitude curve, ERTACache's profile,
the activation ranges of SmoothQuant and static scales, the per-layer sensitivity of mixed
precision. Each is a JSON file named after what it holds (``teacache``, ``activations``,
...) in ``<transformer dir>/calibration/`` (for the reference models: inside the package),
or wherever a technique's ``calibration=PATH`` points. Every file is tagged with the
model's identity, so a calibration is never used on another model.

How a technique makes its calibration is declared where it registers
(:class:`cadence.accel.registry.Calibration`); ``cadence calibrate`` reads it there.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch


def model_identity(model: torch.nn.Module) -> dict:
    """Class, config digest and a weight fingerprint (robust to dtype and device). A model
    quantized by cadence answers for its float weights, so calibrations still match it."""
    quantization = getattr(model, "_cadence_quantization", None)
    if quantization is not None:
        return quantization.identity
    config = {k: v for k, v in dict(getattr(model, "config", {})).items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    with torch.no_grad():
        probe = sum(float(p.detach().flatten()[:64].float().abs().sum()) for p in model.parameters())
    return {"class": type(model).__name__, "config": digest, "weights": f"{probe:.4g}"}


def default_path(model: torch.nn.Module, technique: str) -> Path | None:
    source = getattr(getattr(model, "config", None), "_name_or_path", None)
    return Path(source) / "calibration" / f"{technique}.json" if source else None


def save(model: torch.nn.Module, technique: str, data: dict, path: Path | None = None) -> Path:
    path = Path(path) if path else default_path(model, technique)
    if path is None:
        raise ValueError(
            f"{technique}: the model was not loaded from a directory, so there is no place beside it for the "
            "calibration; give a path"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"technique": technique, "model": model_identity(model), **data}, indent=1) + "\n")
    return path


def load(model: torch.nn.Module, technique: str, path: str = "") -> dict:
    """The calibration of ``technique`` for ``model``; refuses one made for another model."""
    where = Path(path) if path else default_path(model, technique)
    if where is None or not where.is_file():
        missing = ValueError(
            f"{technique}: no calibration for this {type(model).__name__} "
            f"({'looked in ' + str(where) if where else 'it was not loaded from a directory'}); run "
            f"`cadence calibrate --model MODEL --technique {technique}`, or pass calibration=PATH"
        )
        missing.missing_calibration = technique  # the store to make: cadence tune makes it and tries again
        raise missing
    data = json.loads(where.read_text())
    if data.get("technique") != technique:
        raise ValueError(f"{technique}: {where} is a calibration for {data.get('technique')!r}, not {technique!r}")
    identity = model_identity(model)
    if data.get("model") != identity:
        raise ValueError(
            f"{technique}: calibration {where} was made for another model ({data.get('model')}); this model is "
            f"{identity}. Recalibrate with `cadence calibrate --technique {technique}`"
        )
    return data


def runs_summary(runs: list[dict]) -> dict:
    """What a calibration was recorded on: the prompts, the step count, the guidance scale."""

    def setting(*names):
        values = sorted({next((run[n] for n in names if run.get(n) is not None), None) for run in runs} - {None})
        return values[0] if len(values) == 1 else values

    prompts = [run["prompt"] for run in runs if isinstance(run.get("prompt"), str)]
    steps, guidance_scale = setting("num_inference_steps", "steps"), setting("guidance_scale")
    return {"prompts": prompts, "steps": steps, "guidance_scale": guidance_scale}
