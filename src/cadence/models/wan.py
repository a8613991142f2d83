"""Wan (2.1, 2.2): video self-attention in ``attn1``; cross-attention to text (``attn2``)
stays dense. ref-video is a small config of this class."""

from __future__ import annotations

from cadence.models.defaults import VIDEO_PATTERN, VIDEO_RECIPE
from cadence.models.family import Family, FamilyRecipe, TokenLayout, argument, register_family


def modulated_input(block, args, kwargs, hidden):
    """The first block's norm1 output, shifted and scaled by the timestep modulation."""
    temb = argument(args, kwargs, "temb", 2)
    if temb.dim() == 4:  # Wan 2.2 TI2V: per-token modulation (B, tokens, 6, dim)
        shift, scale = (block.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)[:2]
        shift, scale = shift.squeeze(2), scale.squeeze(2)
    else:
        shift, scale = (block.scale_shift_table + temb.float()).chunk(6, dim=1)[:2]
    return block.norm1(hidden.float()) * (1 + scale) + shift


def token_layout(model, args, kwargs):
    _, _, frames, height, width = argument(args, kwargs, "hidden_states", 0).shape  # (B, C, F, H, W)
    pt, ph, pw = model.config.patch_size
    return TokenLayout(frames // pt, height // ph, width // pw)


FAMILY = register_family(Family(
    name="wan",
    classes=("WanTransformer3DModel",),
    blocks=("blocks",),
    token_layout=token_layout,
    attention=("attn1",),
    recipe=FamilyRecipe(
        VIDEO_RECIPE,
        "Wan2.1-1.3B size, 480p x 81, 50 steps with CFG, H100: 4.26x over diffusers bf16 (2.48x for diffusers' "
        "MagCache); ref-video, 50 steps: 36.1 dB",
    ),
    sparse_pattern=VIDEO_PATTERN,
    modulated_input=modulated_input,
    tensor_format="BCFHW",
    references=("ref-video",),
))
