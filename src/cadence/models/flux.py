"""FLUX.1: dual-stream blocks then single-stream blocks, joint attention over [text, image]
in ``attn``. ref-image is a small config of this class."""

from __future__ import annotations

from cadence.models.defaults import IMAGE_PATTERN, IMAGE_RECIPE
from cadence.models.family import Family, FamilyRecipe, TokenLayout, argument, register_family


def modulated_input(block, args, kwargs, hidden):
    """AdaLayerNormZero ``norm1(hidden, emb=temb)``."""
    return block.norm1(hidden, emb=argument(args, kwargs, "temb", 2))[0]


def token_layout(model, args, kwargs):
    ids = kwargs["img_ids"]  # (tokens, 3) of (0, row, column); (B, tokens, 3) deprecated
    ids = ids[0] if ids.dim() == 3 else ids
    text = kwargs["txt_ids"].shape[-2]
    return TokenLayout(1, int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1, text, text_first=True)


FAMILY = register_family(Family(
    name="flux",
    classes=("FluxTransformer2DModel",),
    blocks=("transformer_blocks", "single_transformer_blocks"),
    token_layout=token_layout,
    attention=("attn",),
    recipe=FamilyRecipe(
        IMAGE_RECIPE,
        "compile alone 1.37x at FLUX.1-dev size (1024^2, H100); ref-image magcache(budget=0.5): 34.9 dB at 20 steps",
    ),
    sparse_pattern=IMAGE_PATTERN,
    modulated_input=modulated_input,
    timestep_scale=1000.0,  # the pipeline passes timestep / 1000 and the transformer multiplies it back
    references=("ref-image",),
))
