"""The served models: each loaded once per device slot when the server starts, so that no
request pays for loading, and two slots never share (and so never both accelerate) one
pipeline."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from cadence import generation
from cadence.reference.models import REFERENCE_MODELS
from cadence.serve.catalog import canonical, recipes_for
from cadence.serve.settings import ServeSettings


@dataclass
class ServedModel:
    name: str  # what a request's "model" says
    source: str  # a reference model's name or a checkpoint directory
    pipes: list  # one pipeline per device slot
    default_recipe: str | None
    recipes: list[dict]  # the catalog: /v1/recipes

    @property
    def pipe(self):
        """Slot 0's pipeline: read (never run) to check a request's size and steps."""
        return self.pipes[0]

    @property
    def task(self) -> str:
        return "video" if generation.is_video(self.pipe) else "image"

    def measured(self, recipe: str) -> dict | None:
        return next((entry for entry in self.recipes if entry["recipe"] == recipe), None)

    def describe(self) -> dict:
        size = generation.default_size(self.pipe)
        return {"id": self.name, "object": "model", "owned_by": "cadence", "task": self.task,
                "transformer": type(self.pipe.transformer).__name__, "default_recipe": self.default_recipe,
                "default_size": {"height": size.height, "width": size.width, "frames": size.frames},
                "max_steps": generation.step_limit(self.pipe)}


def parse_model(spec: str) -> tuple[str, str]:
    """``ref-video`` | ``NAME=DIR`` | ``DIR`` -> (name, source)."""
    name, equals, source = spec.partition("=")
    if not equals:
        name, source = (spec, spec) if spec in REFERENCE_MODELS else (Path(spec).name or spec, spec)
    if source not in REFERENCE_MODELS and not Path(source).is_dir():
        raise ValueError(f"--model {spec!r}: {source!r} is neither a reference model ({', '.join(REFERENCE_MODELS)}) "
                         "nor a diffusers checkpoint directory")
    if not name:
        raise ValueError(f"--model {spec!r}: the name before '=' is empty")
    return name, source


def load_models(settings: ServeSettings) -> dict[str, ServedModel]:
    import cadence
    from cadence.models.family import find_family

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download at run time
    dtype = getattr(torch, settings.dtype)
    served: dict[str, ServedModel] = {}
    for spec in settings.models:
        name, source = parse_model(spec)
        if name in served:
            raise ValueError(f"--model {spec!r}: the name {name!r} is served already; name it NAME=DIR")
        pipes = []
        for _ in range(settings.concurrency):
            pipe = cadence.load(source, device=settings.device, dtype=None if dtype == torch.float32 else dtype)
            pipe.set_progress_bar_config(disable=True)
            pipes.append(pipe)
        transformer = type(pipes[0].transformer).__name__
        family = find_family(name) or find_family(transformer)
        default = canonical(family.recipe.recipe) if family else None
        served[name] = ServedModel(name, source, pipes, default, recipes_for(name, transformer))
    return served
