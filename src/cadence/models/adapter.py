"""What an accelerator reads off a model: its family's blocks, in execution order, how
each block passes its hidden states, and the family's readers.

The block metadata (which output is the hidden state, which the text stream) comes from
diffusers' own ``TransformerBlockRegistry``, so every family diffusers' cache hooks know
is known here too."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

from cadence.models.family import Family, TokenLayout, families, find_family


@dataclass
class Adapter:
    family: Family
    blocks: list[torch.nn.Module]  # execution order
    metadata: list[TransformerBlockMetadata]
    model: torch.nn.Module | None = None

    def token_layout(self, args, kwargs) -> TokenLayout:
        """The layout of the joint attention sequence in the forward about to run."""
        return self.family.token_layout(self.model, args, kwargs)

    def attention_modules(self) -> list[torch.nn.Module]:
        """The self- or joint-attention modules, one per block, in execution order."""
        names = self.family.attention
        return [getattr(block, name) for block in self.blocks for name in names if hasattr(block, name)]

    def modulated_input(self, block, args, kwargs, hidden) -> torch.Tensor:
        read = self.family.modulated_input
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
    family = find_family(name)
    if family is None or name not in family.classes:
        supported = sorted(cls for known in families() for cls in known.classes)
        raise ValueError(f"no cadence adapter for {name}; supported: {', '.join(supported)}")
    blocks = [block for attribute in family.blocks for block in getattr(model, attribute, [])]
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
