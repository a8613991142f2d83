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

# Block-list attributes, in the order a family's forward runs them. Families are added
# here as their tests land (tests/models/test_adapters.py).
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "WanTransformer3DModel": ("wan", ("blocks",)),
    "FluxTransformer2DModel": ("flux", ("transformer_blocks", "single_transformer_blocks")),
}


def _wan_modulated(block, args, kwargs, hidden):
    """Wan: the first block's norm1 output, shifted and scaled by the timestep modulation."""
    temb = kwargs["temb"] if "temb" in kwargs else args[2]
    if temb.dim() == 4:  # Wan 2.2 TI2V: per-token modulation (B, tokens, 6, dim)
        shift, scale = (block.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)[:2]
        shift, scale = shift.squeeze(2), scale.squeeze(2)
    else:
        shift, scale = (block.scale_shift_table + temb.float()).chunk(6, dim=1)[:2]
    return block.norm1(hidden.float()) * (1 + scale) + shift


def _norm1_emb(block, args, kwargs, hidden):
    """FLUX, SD3, HunyuanVideo: AdaLayerNormZero ``norm1(hidden, emb=temb)``."""
    temb = kwargs["temb"] if "temb" in kwargs else args[2]
    return block.norm1(hidden, emb=temb)[0]


# family -> how to read the timestep-modulated input of the first block (TeaCache's
# indicator). Families without one fall back to the block's input hidden states.
MODULATED_INPUT: dict[str, Callable] = {"wan": _wan_modulated, "flux": _norm1_emb}


@dataclass
class Adapter:
    family: str
    blocks: list[torch.nn.Module]  # execution order
    metadata: list[TransformerBlockMetadata]

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
    return Adapter(family, blocks, metadata)
