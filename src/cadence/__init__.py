"""cadence: make diffusion transformers generate several times faster, with the quality
loss measured and bounded. ``cadence.accelerate(pipe, recipe)`` is the one verb."""

from cadence.context import StepContext, get_context
from cadence.loading import load
from cadence.recipe import Recipe, accelerate

__version__ = "0.1.0"
__all__ = ["Recipe", "StepContext", "accelerate", "get_context", "load", "__version__"]
