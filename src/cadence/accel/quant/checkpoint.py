"""Save and load quantized transformers as safetensors, so quantization (and the
calibration and sensitivity runs behind it) happens once.

A file holds every quantized layer's tensors (``<layer>.<tensor>``) and, in the safetensors
metadata, the technique that made it, each layer's mode, and the identity of the float model
it was made from: loading it into another model is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cadence.accel.calibration import model_identity
from cadence.accel.quant.linear import QuantLinear

FORMAT = "cadence-quantized-linears/1"


def save(model: torch.nn.Module, path: str | Path) -> Path:
    """Write the quantized layers of ``model`` (quantized by a cadence technique) to ``path``."""
    quantization = getattr(model, "_cadence_quantization", None)
    if quantization is None:
        raise ValueError("the model is not quantized by cadence: apply a quantization technique first "
                         "(e.g. cadence.accelerate(pipe, 'fp8'))")
    tensors, layers = {}, {}
    for name, mode in quantization.modes.items():
        module: QuantLinear = model.get_submodule(name)
        layers[name] = {"mode": mode, "group": module.group}
        for buffer, tensor in module.named_buffers():
            tensors[f"{name}.{buffer}"] = tensor.detach().contiguous().cpu()
    metadata = {"format": FORMAT, "technique": quantization.config.name, "config": str(quantization.config),
                "model": json.dumps(quantization.identity), "layers": json.dumps(layers)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def read(model: torch.nn.Module, config) -> tuple[dict[str, dict], dict[str, dict[str, torch.Tensor]]]:
    """-> (plan: layer -> {mode, group}, tensors: layer -> {name: tensor}) from config.checkpoint."""
    from safetensors import safe_open

    path = Path(config.checkpoint)
    if not path.is_file():
        raise ValueError(f"{config.name}: checkpoint={str(path)!r} does not exist; write one with `cadence quantize`")
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{config.name}: {path} is not a cadence quantized checkpoint (format {metadata.get('format')!r})")
    if metadata["technique"] != config.name:
        raise ValueError(f"{config.name}: {path} holds {metadata['config']}, not {config.name}; "
                         f"load it with the recipe term {metadata['technique']}(checkpoint=...)")
    identity = model_identity(model)
    if json.loads(metadata["model"]) != identity:
        raise ValueError(f"{config.name}: {path} was quantized from another model ({metadata['model']}); this model "
                         f"is {identity}")
    layers = json.loads(metadata["layers"])
    flat = load_file(str(path))
    tensors: dict[str, dict[str, torch.Tensor]] = {name: {} for name in layers}
    for key, tensor in flat.items():
        name, _, buffer = key.rpartition(".")
        tensors[name][buffer] = tensor
    return layers, tensors
