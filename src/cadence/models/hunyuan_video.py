"""HunyuanVideo: dual-stream then single-stream blocks; both take and return (video, text)
separately (the single blocks concatenate inside). The text token refiner runs before the
stack, in context_embedder, and is not part of it. Joint attention over [video, text] in
``attn``, always masked (the padded text)."""

from __future__ import annotations

from cadence.models.defaults import VIDEO_PATTERN
from cadence.models.family import Family, FamilyRecipe, TokenLayout, argument, register_family


def modulated_input(block, args, kwargs, hidden):
    """AdaLayerNormZero of the first dual-stream block. The forward passes the block
    arguments by position: (hidden, encoder, temb, attention_mask, rotary,
    token_replace_emb, first_frame_num_tokens)."""
    temb = argument(args, kwargs, "temb", 2)
    if type(block).__name__ == "HunyuanVideoTokenReplaceTransformerBlock":
        # I2V: the first frame's tokens are modulated by their own (t=0) embedding.
        token_replace_emb = argument(args, kwargs, "token_replace_emb", 5)
        return block.norm1(hidden, temb, token_replace_emb, argument(args, kwargs, "num_tokens", 6))[0]
    return block.norm1(hidden, emb=temb)[0]


def token_layout(model, args, kwargs):
    _, _, frames, height, width = argument(args, kwargs, "hidden_states", 0).shape  # (B, C, F, H, W)
    patch, patch_t = model.config.patch_size, model.config.patch_size_t
    text = argument(args, kwargs, "encoder_hidden_states", 2).shape[1]
    return TokenLayout(frames // patch_t, height // patch, width // patch, text)  # [video, text]


FAMILY = register_family(Family(
    name="hunyuan_video",
    classes=("HunyuanVideoTransformer3DModel",),
    blocks=("transformer_blocks", "single_transformer_blocks"),
    token_layout=token_layout,
    attention=("attn",),
    recipe=FamilyRecipe(
        "magcache(budget=0.3) + compile",
        "compile alone 1.24x at HunyuanVideo size (480 x 848 x 61, H100); its attention masks the padded text, "
        "where low-precision attention falls back to SDPA",
    ),
    sparse_pattern=VIDEO_PATTERN,
    modulated_input=modulated_input,
))
