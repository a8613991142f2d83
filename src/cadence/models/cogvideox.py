"""CogVideoX: video and text modulated together, joint attention over [text, video] in
``attn1``; the latent is (B, frames, C, H, W)."""

from __future__ import annotations

from cadence.models.defaults import VIDEO_PATTERN, VIDEO_RECIPE
from cadence.models.family import Family, FamilyRecipe, TokenLayout, argument, register_family


def modulated_input(block, args, kwargs, hidden):
    """CogVideoXLayerNormZero modulates video and text together,
    ``norm1(hidden, encoder, temb)`` -> (video, text, gate, text gate)."""
    encoder = argument(args, kwargs, "encoder_hidden_states", 1)
    return block.norm1(hidden, encoder, argument(args, kwargs, "temb", 2))[0]


def token_layout(model, args, kwargs):
    _, frames, _, height, width = argument(args, kwargs, "hidden_states", 0).shape  # (B, F, C, H, W)
    patch, patch_t = model.config.patch_size, model.config.patch_size_t or 1
    text = argument(args, kwargs, "encoder_hidden_states", 1).shape[1]
    return TokenLayout(frames // patch_t, height // patch, width // patch, text, text_first=True)


FAMILY = register_family(Family(
    name="cogvideox",
    classes=("CogVideoXTransformer3DModel",),
    blocks=("transformer_blocks",),
    token_layout=token_layout,
    attention=("attn1",),
    recipe=FamilyRecipe(
        VIDEO_RECIPE,
        "compile alone 1.19x at CogVideoX-2B size (480 x 720 x 49, H100); the composition measured on Wan only",
    ),
    sparse_pattern=VIDEO_PATTERN,
    modulated_input=modulated_input,
    tensor_format="BFCHW",
))
