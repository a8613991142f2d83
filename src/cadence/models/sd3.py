"""Stable Diffusion 3 (MMDiT): joint attention over [image, text] in ``attn``.

The last block is context_pre_only: it returns None for the text stream, which is never
read after it, so a reused stack passes the text stream through unchanged. No CacheMixin:
the step is inferred from the timestep. Not supported by step reuse: skip_layers
(skip-layer guidance, a third forward per step) and ControlNet residuals (added by the
model between blocks, so a reused span would add them twice)."""

from __future__ import annotations

from cadence.models.defaults import IMAGE_PATTERN, IMAGE_RECIPE
from cadence.models.family import Family, FamilyRecipe, TokenLayout, argument, register_family


def modulated_input(block, args, kwargs, hidden):
    """JointTransformerBlock: AdaLayerNormZero ``norm1(hidden, emb=temb)``, as in FLUX."""
    return block.norm1(hidden, emb=argument(args, kwargs, "temb", 2))[0]


def token_layout(model, args, kwargs):
    _, _, height, width = argument(args, kwargs, "hidden_states", 0).shape  # (B, C, H, W)
    patch = model.config.patch_size
    text = argument(args, kwargs, "encoder_hidden_states", 1).shape[1]
    return TokenLayout(1, height // patch, width // patch, text)  # JointAttnProcessor: [image, text]


FAMILY = register_family(Family(
    name="sd3",
    classes=("SD3Transformer2DModel",),
    blocks=("transformer_blocks",),
    token_layout=token_layout,
    attention=("attn",),
    recipe=FamilyRecipe(IMAGE_RECIPE, "not measured at SD3's size; the FLUX composition"),
    sparse_pattern=IMAGE_PATTERN,
    modulated_input=modulated_input,
))
