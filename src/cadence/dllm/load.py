"""Load ref-dllm (or any LLaDA-family or DiffusionGemma checkpoint directory) and accelerate dLLM pipelines."""

from __future__ import annotations

from pathlib import Path

import torch

from cadence.dllm.tokenizer import check_tokenizer, load_tokenizer

CHECKPOINT = Path(__file__).resolve().parents[1] / "reference" / "checkpoints" / "ref-dllm"


def checkpoint_directory(path: str | Path | None = None) -> Path:
    """The directory of ``path``: ref-dllm's shipped checkpoint for None or "ref-dllm"."""
    return Path(path) if path is not None and str(path) != "ref-dllm" else CHECKPOINT


def load(path: str | Path | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of ref-dllm, or of the checkpoint directory ``path`` (a LLaDA-family
    ``EuroBertForMaskedLM``, or a ``DiffusionGemmaForBlockDiffusion`` by its ``model_type``),
    checked to match. Weights shipped xz-packed (ref-dllm's) are unpacked once into the cache
    (``loading.unpacked``)."""
    import json

    import transformers

    from cadence.loading import unpacked

    directory = checkpoint_directory(path)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"no dLLM checkpoint in {str(directory)!r} (config.json missing); ref-dllm is made by "
                                "`cadence dllm train --out src/cadence/reference/checkpoints/ref-dllm`")
    directory = unpacked(directory)
    gemma = json.loads((directory / "config.json").read_text()).get("model_type") == "diffusion_gemma"
    model_class = getattr(transformers, "DiffusionGemmaForBlockDiffusion" if gemma else "EuroBertForMaskedLM")
    model = model_class.from_pretrained(directory, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    tokenizer = load_tokenizer(directory)
    check_tokenizer(model, tokenizer)
    return model, tokenizer


def accelerate(target, recipe):
    """``cadence.accelerate`` for diffusion LMs: a LLaDA-family model, or a pipeline holding
    one as ``model`` (diffusers' ``LLaDA2Pipeline``). A pipeline decodes with its own scheduler
    (its ``threshold`` and ``block_length`` are that scheduler's arguments), so only a cache
    term accelerates it; a decoding-policy term is refused there rather than silently unused."""
    from cadence.accel.registry import TECHNIQUES
    from cadence.dllm import cache, cache_features, cache_refresh, policies, sparse  # noqa: F401  (register the terms)
    from cadence.recipe import accelerate as accelerate_model
    from cadence.recipe import as_recipe

    recipe = as_recipe(recipe)
    if isinstance(target, torch.nn.Module):
        return accelerate_model(target, recipe)
    model = getattr(target, "model", None)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"cannot find a diffusion LM in {type(target).__name__}: pass the model, or a pipeline "
                        "holding it as `model` (diffusers' LLaDA2Pipeline)")
    foreign = [str(term) for term in recipe.techniques if getattr(term, "role", None) != "cache"]
    if foreign:
        caches = [name for name, technique in TECHNIQUES.items() if getattr(technique.config, "role", None) == "cache"]
        raise ValueError(f"{type(target).__name__} decodes with its own scheduler, so {', '.join(foreign)} would do "
                         "nothing there: pass threshold= and block_length= to the pipeline call, and accelerate it "
                         f"with a cache ({', '.join(caches)})")
    return accelerate_model(model, recipe)
