"""Model adapters: what an accelerator needs to know about a model family — where the
transformer blocks are, in execution order, and how each block passes its hidden states.

The block metadata (which output is the hidden state, which the text stream) comes from
diffusers' own ``TransformerBlockRegistry``, so every family diffusers' cache hooks know
is known here too."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

# Block-list attributes, in the order a family's forward runs them. Every family is tested
# on a tiny random config in tests/models/test_families.py.
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "WanTransformer3DModel": ("wan", ("blocks",)),
    "FluxTransformer2DModel": ("flux", ("transformer_blocks", "single_transformer_blocks")),
    # The last block is context_pre_only: it returns None for the text stream, which is
    # never read after it, so a reused stack passes the text stream through unchanged.
    # No CacheMixin: the step is inferred from the timestep. Not supported by step reuse:
    # skip_layers (skip-layer guidance, a third forward per step) and ControlNet residuals
    # (added by the model between blocks, so a reused span would add them twice).
    "SD3Transformer2DModel": ("sd3", ("transformer_blocks",)),
    "CogVideoXTransformer3DModel": ("cogvideox", ("transformer_blocks",)),
    # Dual-stream then single-stream blocks; both take and return (video, text) separately
    # (the single blocks concatenate inside). The text token refiner runs before the stack,
    # in context_embedder, and is not part of it.
    "HunyuanVideoTransformer3DModel": ("hunyuan_video", ("transformer_blocks", "single_transformer_blocks")),
    "LTXVideoTransformer3DModel": ("ltx", ("transformer_blocks",)),
}


def _arg(args, kwargs, name, index):
    """A block argument that a model forward passes by keyword or by position."""
    return kwargs[name] if name in kwargs else args[index]


def _wan_modulated(block, args, kwargs, hidden):
    """Wan: the first block's norm1 output, shifted and scaled by the timestep modulation."""
    temb = _arg(args, kwargs, "temb", 2)
    if temb.dim() == 4:  # Wan 2.2 TI2V: per-token modulation (B, tokens, 6, dim)
        shift, scale = (block.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)[:2]
        shift, scale = shift.squeeze(2), scale.squeeze(2)
    else:
        shift, scale = (block.scale_shift_table + temb.float()).chunk(6, dim=1)[:2]
    return block.norm1(hidden.float()) * (1 + scale) + shift


def _norm1_emb(block, args, kwargs, hidden):
    """FLUX, SD3 (JointTransformerBlock): AdaLayerNormZero ``norm1(hidden, emb=temb)``."""
    return block.norm1(hidden, emb=_arg(args, kwargs, "temb", 2))[0]


def _cogvideox_modulated(block, args, kwargs, hidden):
    """CogVideoX: CogVideoXLayerNormZero modulates video and text together,
    ``norm1(hidden, encoder, temb)`` -> (video, text, gate, text gate)."""
    encoder = _arg(args, kwargs, "encoder_hidden_states", 1)
    return block.norm1(hidden, encoder, _arg(args, kwargs, "temb", 2))[0]


def _hunyuan_video_modulated(block, args, kwargs, hidden):
    """HunyuanVideo: AdaLayerNormZero of the first dual-stream block. The forward passes
    the block arguments by position: (hidden, encoder, temb, attention_mask, rotary,
    token_replace_emb, first_frame_num_tokens)."""
    temb = _arg(args, kwargs, "temb", 2)
    if type(block).__name__ == "HunyuanVideoTokenReplaceTransformerBlock":
        # I2V: the first frame's tokens are modulated by their own (t=0) embedding.
        token_replace_emb = _arg(args, kwargs, "token_replace_emb", 5)
        return block.norm1(hidden, temb, token_replace_emb, _arg(args, kwargs, "num_tokens", 6))[0]
    return block.norm1(hidden, emb=temb)[0]


def _ltx_modulated(block, args, kwargs, hidden):
    """LTX-Video: like Wan, a scale_shift_table plus the timestep embedding, here of shape
    (B, 1 or tokens, 6 * dim): one row per token when the pipeline conditions frames."""
    temb = _arg(args, kwargs, "temb", 2)
    ada = block.scale_shift_table[None, None] + temb.reshape(hidden.size(0), temb.size(1), 6, -1)  # (B, T, 6, dim)
    shift, scale = ada[:, :, 0], ada[:, :, 1]
    return block.norm1(hidden) * (1 + scale) + shift


# family -> how to read the timestep-modulated input of the first block (TeaCache's
# indicator). Families without one fall back to the block's input hidden states.
MODULATED_INPUT: dict[str, Callable] = {
    "wan": _wan_modulated,
    "flux": _norm1_emb,
    "sd3": _norm1_emb,
    "cogvideox": _cogvideox_modulated,
    "hunyuan_video": _hunyuan_video_modulated,
    "ltx": _ltx_modulated,
}


@dataclass(frozen=True)
class TokenLayout:
    """How one attention call's joint sequence is made: ``frames x height x width`` video
    (or image) tokens in raster order after patchifying, and ``text`` text tokens before or
    after them (joint attention, as in FLUX, SD3, CogVideoX and HunyuanVideo). Self-attention
    over video alone (Wan, LTX) has ``text = 0``."""

    frames: int
    height: int
    width: int
    text: int = 0
    text_first: bool = False

    @property
    def video(self) -> int:
        return self.frames * self.height * self.width

    @property
    def tokens(self) -> int:
        return self.video + self.text


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _hidden(args, kwargs):
    return _arg(args, kwargs, "hidden_states", 0)


def _wan_layout(model, args, kwargs):
    _, _, frames, height, width = _hidden(args, kwargs).shape  # (B, C, F, H, W)
    pt, ph, pw = model.config.patch_size
    return TokenLayout(frames // pt, height // ph, width // pw)


def _flux_layout(model, args, kwargs):
    ids = kwargs["img_ids"]  # (tokens, 3) of (0, row, column); (B, tokens, 3) deprecated
    ids = ids[0] if ids.dim() == 3 else ids
    text = kwargs["txt_ids"].shape[-2]
    return TokenLayout(1, int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1, text, text_first=True)


def _sd3_layout(model, args, kwargs):
    _, _, height, width = _hidden(args, kwargs).shape  # (B, C, H, W)
    patch = model.config.patch_size
    text = _arg(args, kwargs, "encoder_hidden_states", 1).shape[1]
    return TokenLayout(1, height // patch, width // patch, text)  # JointAttnProcessor: [image, text]


def _cogvideox_layout(model, args, kwargs):
    _, frames, _, height, width = _hidden(args, kwargs).shape  # (B, F, C, H, W)
    patch, patch_t = model.config.patch_size, model.config.patch_size_t or 1
    text = _arg(args, kwargs, "encoder_hidden_states", 1).shape[1]
    return TokenLayout(frames // patch_t, height // patch, width // patch, text, text_first=True)


def _hunyuan_video_layout(model, args, kwargs):
    _, _, frames, height, width = _hidden(args, kwargs).shape  # (B, C, F, H, W)
    patch, patch_t = model.config.patch_size, model.config.patch_size_t
    text = _arg(args, kwargs, "encoder_hidden_states", 2).shape[1]
    return TokenLayout(frames // patch_t, height // patch, width // patch, text)  # [video, text]


def _ltx_layout(model, args, kwargs):
    return TokenLayout(kwargs["num_frames"], kwargs["height"], kwargs["width"])  # latent sizes


# family -> (how to read the token layout of the joint attention from the transformer's
# forward arguments, the names of the block attributes that hold self- or joint attention).
# Cross-attention to text (Wan's and LTX's attn2) is never listed: it stays dense.
ATTENTION: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "wan": (_wan_layout, ("attn1",)),
    "flux": (_flux_layout, ("attn",)),
    "sd3": (_sd3_layout, ("attn",)),
    "cogvideox": (_cogvideox_layout, ("attn1",)),
    "hunyuan_video": (_hunyuan_video_layout, ("attn",)),
    "ltx": (_ltx_layout, ("attn1",)),
}


@dataclass
class Adapter:
    family: str
    blocks: list[torch.nn.Module]  # execution order
    metadata: list[TransformerBlockMetadata]
    model: torch.nn.Module | None = None

    def token_layout(self, args, kwargs) -> TokenLayout:
        """The layout of the joint attention sequence in the forward about to run."""
        read, _ = ATTENTION[self.family]
        return read(self.model, args, kwargs)

    def attention_modules(self) -> list[torch.nn.Module]:
        """The self- or joint-attention modules, one per block, in execution order."""
        _, names = ATTENTION[self.family]
        return [getattr(block, name) for block in self.blocks for name in names if hasattr(block, name)]

    def modulated_input(self, block, args, kwargs, hidden) -> torch.Tensor:
        read = MODULATED_INPUT.get(self.family)
        with torch.no_grad():
            return read(block, args, kwargs, hidden) if read else hidden


def find_transformer(target) -> torch.nn.Module:
    """The denoiser of a pipeline, or the model itself."""
    if isinstance(target, torch.nn.Module):
        return target
    transformer = getattr(target, "transformer", None)
    if isinstance(transformer, torch.nn.Module):
        return transformer
    raise TypeError(
        f"cannot find a transformer in {type(target).__name__}: pass a diffusers pipeline with a "
        "`transformer` component, or the transformer module itself"
    )


def adapter_for(model: torch.nn.Module) -> Adapter:
    name = type(model).__name__
    if name not in FAMILIES:
        raise ValueError(
            f"no cadence adapter for {name}; supported: {', '.join(sorted(FAMILIES))}"
        )
    family, attributes = FAMILIES[name]
    blocks = [block for attribute in attributes for block in getattr(model, attribute, [])]
    metadata = [TransformerBlockRegistry.get(type(block)) for block in blocks]
    return Adapter(family, blocks, metadata, model)


def quantizable_linears(model: torch.nn.Module, timestep_path: str = "full") -> dict[str, torch.nn.Linear]:
    """What quantization may swap: the linears of the transformer blocks, by name in the model. With ``timestep_path=
    'full'`` the AdaLN modulation linears (``norm*.linear``, fed by the timestep embedding)
    are left out: TFMQ-DM finds the timestep features the most quantization-sensitive part
    of a diffusion model, and they are a one-row matmul per sample, so nothing is gained."""
    adapter = adapter_for(model)
    block_ids = {id(block) for block in adapter.blocks}
    prefixes = [name + "." for name, module in model.named_modules() if id(module) in block_ids]
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or not any(name.startswith(p) for p in prefixes):
            continue
        if timestep_path == "full" and any(part.startswith("norm") for part in name.split(".")[:-1]):
            continue
        found[name] = module
    return found
