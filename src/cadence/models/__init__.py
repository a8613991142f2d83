"""Model adapters: what an accelerator needs to know about a model family — where the
transformer blocks are, in execution order, and how each block passes its hidden states.

The block metadata (which output is the hidden state, which the text stream) comes from
diffusers' own ``TransformerBlockRegistry``, so every family diffusers' cache hooks know
is known here too."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

# Block-list attributes, in the order a family's forward runs them. Families are added
# here as their tests land (tests/models/test_adapters.py).
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "WanTransformer3DModel": ("wan", ("blocks",)),
    "FluxTransformer2DModel": ("flux", ("transformer_blocks", "single_transformer_blocks")),
}


@dataclass
class Adapter:
    family: str
    blocks: list[torch.nn.Module]  # execution order
    metadata: list[TransformerBlockMetadata]


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
