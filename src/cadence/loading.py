"""``cadence.load``: a reference model by name, or a local diffusers checkpoint directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cadence.reference.models import REFERENCE_MODELS, reference_model

# Pickle-based formats can run arbitrary code when loaded: cadence refuses them.
UNSAFE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def load(name_or_path: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
         text_encoder: bool = True):
    """``load("ref-video")``, ``load("ref-image")`` or ``load("/path/to/diffusers/checkpoint")``."""
    if name_or_path in REFERENCE_MODELS:
        pipe = load_reference(name_or_path, text_encoder=text_encoder)
    else:
        path = Path(name_or_path)
        if not path.is_dir():
            raise ValueError(
                f"unknown model {name_or_path!r}; valid: {', '.join(REFERENCE_MODELS)}, "
                "or a local diffusers checkpoint directory (with model_index.json)"
            )
        pipe = load_pipeline_dir(path)
    if device is not None or dtype is not None:
        pipe.to(device=device, dtype=dtype)
    return pipe


def check_safetensors_only(path: Path) -> None:
    unsafe = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.suffix in UNSAFE_WEIGHTS)
    if unsafe:
        raise ValueError(
            f"checkpoint {str(path)!r} holds non-safetensors weights ({', '.join(unsafe[:3])}): cadence loads "
            "safetensors only, since pickle-based files can run code when loaded; convert them to .safetensors"
        )


def load_pipeline_dir(path: Path):
    from diffusers import DiffusionPipeline

    from cadence.reference.pipelines import RefImagePipeline, RefVideoPipeline

    index = path / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{str(path)!r} is not a diffusers pipeline directory: it has no model_index.json")
    check_safetensors_only(path)
    class_name = json.loads(index.read_text()).get("_class_name")
    ours = {"RefVideoPipeline": RefVideoPipeline, "RefImagePipeline": RefImagePipeline}
    pipeline_cls = ours.get(class_name, DiffusionPipeline)
    return pipeline_cls.from_pretrained(str(path), use_safetensors=True)


def load_reference(name: str, text_encoder: bool = True):
    model = reference_model(name)
    weights = model.checkpoint / "transformer"
    if not (weights / "config.json").is_file():
        raise FileNotFoundError(
            f"{name} has no trained checkpoint at {weights}; train one with `cadence train --model {name}`"
        )
    check_safetensors_only(model.checkpoint)
    transformer = model.transformer_cls.from_pretrained(str(weights), use_safetensors=True, torch_dtype=torch.float32)
    tokenizer = encoder = None
    if text_encoder:
        from cadence.reference.text import load_text_encoder

        tokenizer, encoder = load_text_encoder()
    return model.pipeline_cls(transformer=transformer, scheduler=model.scheduler(), text_encoder=encoder, tokenizer=tokenizer)
