"""Model families: what an accelerator needs to know about each kind of diffusion
transformer. One file per family registers one :class:`Family` (family.py says what one
holds); importing this package registers them all."""

from cadence.models import cogvideox, flux, hunyuan_video, ltx, sd3, wan  # noqa: F401  (each registers its family)
from cadence.models.adapter import Adapter, adapter_for, find_transformer, quantizable_linears
from cadence.models.defaults import default_recipe
from cadence.models.family import (
    Family,
    FamilyRecipe,
    TokenLayout,
    families,
    find_family,
    register_family,
    unregister_family,
)

__all__ = [
    "Adapter", "Family", "FamilyRecipe", "TokenLayout", "adapter_for", "default_recipe", "families", "find_family",
    "find_transformer", "quantizable_linears", "register_family", "unregister_family",
]
