"""LTX-Video: video self-attention in ``attn1`` (cross-attention to text, ``attn2``, stays
dense); the latent is packed (B, tokens, channels), its sizes passed beside it."""

from __future__ import annotations

from cadence.models.defaults import VIDEO_PATTERN, VIDEO_RECIPE
from cadence.models.family import Family, FamilyRecipe, TokenLayout, argument, register_family


def modulated_input(block, args, kwargs, hidden):
    """Like Wan, a scale_shift_table plus the timestep embedding, here of shape
    (B, 1 or tokens, 6 * dim): one row per token when the pipeline conditions frames."""
    temb = argument(args, kwargs, "temb", 2)
    ada = block.scale_shift_table[None, None] + temb.reshape(hidden.size(0), temb.size(1), 6, -1)  # (B, T, 6, dim)
    shift, scale = ada[:, :, 0], ada[:, :, 1]
    return block.norm1(hidden) * (1 + scale) + shift


def token_layout(model, args, kwargs):
    return TokenLayout(kwargs["num_frames"], kwargs["height"], kwargs["width"])  # latent sizes


FAMILY = register_family(Family(
    name="ltx",
    classes=("LTXVideoTransformer3DModel",),
    blocks=("transformer_blocks",),
    token_layout=token_layout,
    attention=("attn1",),
    recipe=FamilyRecipe(VIDEO_RECIPE, "not measured at LTX-Video's size; the Wan composition"),
    sparse_pattern=VIDEO_PATTERN,
    modulated_input=modulated_input,
))
