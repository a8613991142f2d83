"""Sequence parallelism (Ulysses, Ring, both) on diffusers' context-parallel hooks.

diffusers 0.42 ships the split and gather points of each transformer it supports as the
class's ``_cp_plan`` (Wan: the first block's input and the rotary table are split along
the tokens, ``proj_out``'s output is gathered), and the Ulysses all-to-all and the Ring
exchange inside its attention dispatcher. ``enable_parallelism`` builds its own mesh over
every process and cannot be undone; cadence sets the same pieces up on a sub-mesh of its
(cfg, ring, ulysses) mesh and takes them off again in ``remove``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from diffusers.hooks.context_parallel import (
    apply_context_parallel,
    remove_context_parallel,
)
from diffusers.models._modeling_parallel import ContextParallelConfig
from diffusers.models._modeling_parallel import (
    ParallelConfig as DiffusersParallelConfig,
)
from torch.distributed.device_mesh import DeviceMesh

from cadence.models import TokenLayout, adapter_for
from cadence.parallel.config import ParallelConfig

# Ring attention merges partial outputs by their log-sum-exp; diffusers' native (SDPA)
# backend returns none, its cuDNN one does (bf16 / fp16 on a GPU).
RING_BACKEND = "_native_cudnn"


def _attention_processors(model: torch.nn.Module) -> list:
    """Every attention processor of the model, under cadence's stand-in where one wraps it
    (the stand-in forwards attribute reads, not writes: the settings go on the processor)."""
    processors = []
    for module in model.modules():
        processor = getattr(module, "processor", None)
        while processor is not None and "processor" in vars(processor):
            processor = vars(processor)["processor"]
        if processor is not None and hasattr(processor, "_parallel_config"):
            processors.append(processor)
    return processors


def check_sequence(model: torch.nn.Module, config: ParallelConfig, device: torch.device) -> None:
    name = type(model).__name__
    if getattr(model, "_cp_plan", None) is None:
        raise ValueError(f"parallel {config}: {name} has no context-parallel plan in diffusers 0.42 (WanTransformer3DModel,"
                         f" FluxTransformer2DModel and LTXVideoTransformer3DModel have one); run it with cfg=2 alone")
    heads = getattr(model.config, "num_attention_heads", None)
    if heads is not None and heads % config.ulysses:
        valid = [d for d in range(1, heads + 1) if heads % d == 0]
        raise ValueError(f"parallel ulysses={config.ulysses}: {name} has {heads} attention heads, which Ulysses splits "
                         f"evenly over its ranks; valid ulysses degrees: {valid}")
    if config.ring > 1 and device.type != "cuda":
        raise ValueError(f"parallel ring={config.ring} needs attention that returns its log-sum-exp (diffusers' cuDNN "
                         f"backend on a GPU); on {device.type} use ulysses instead")
    if getattr(model, "_parallel_config", None) is not None:
        raise ValueError(f"{name} already runs in parallel (enable_parallelism or an earlier accelerate); remove it first")


def check_layout(layout: TokenLayout, config: ParallelConfig) -> None:
    """diffusers splits the video tokens (and FLUX's text tokens) into equal slices."""
    for what, count in (("video", layout.video), ("text", layout.text)):
        if count % config.sequence:
            raise ValueError(f"parallel {config}: {count} {what} tokens do not split into {config.sequence} equal slices "
                             f"(ulysses x ring); choose a size whose {what} token count is a multiple of "
                             f"{config.sequence}")


def arrival_order(layout: TokenLayout, ranks: int) -> torch.Tensor | None:
    """Where each token of a Ulysses attention call sits in the layout's own order, or None
    when it sits in order. Each rank holds [its text slice, its video slice]; the all-to-all
    lays the ranks' slices end to end, so a joint [text, video] sequence arrives as
    [text 0, video 0, text 1, video 1, ...]. (B, H, tokens, D) -> index over tokens."""
    if layout.text == 0 or ranks == 1:
        return None
    text, video = layout.text // ranks, layout.video // ranks
    text_start, video_start = (0, layout.text) if layout.text_first else (layout.video, 0)
    order = []
    for rank in range(ranks):
        text_part = text_start + torch.arange(rank * text, (rank + 1) * text)
        video_part = video_start + torch.arange(rank * video, (rank + 1) * video)
        order += [text_part, video_part] if layout.text_first else [video_part, text_part]
    return torch.cat(order)


class SequenceParallel:
    """diffusers' context-parallel hooks on one transformer, on cadence's mesh."""

    def __init__(self, model: torch.nn.Module, config: ParallelConfig, mesh: DeviceMesh, device: torch.device):
        check_sequence(model, config, device)
        self.model, self.config = model, config
        self.plan = model._cp_plan
        context = ContextParallelConfig(ring_degree=config.ring, ulysses_degree=config.ulysses,
                                        mesh=mesh["ring", "ulysses"])
        self.diffusers_config = DiffusersParallelConfig(context_parallel_config=context)
        self.diffusers_config.setup(dist.get_rank(), dist.get_world_size(), device, mesh=context.mesh)
        self.group = context._flattened_mesh.get_group()
        self.processors = _attention_processors(model)
        self.backends = [processor._attention_backend for processor in self.processors]
        for processor in self.processors:
            processor._parallel_config = self.diffusers_config
            if config.ring > 1:
                processor._attention_backend = RING_BACKEND
        model._parallel_config = self.diffusers_config
        apply_context_parallel(model, context, self.plan)

    def remove(self) -> None:
        remove_context_parallel(self.model, self.plan)
        for processor, backend in zip(self.processors, self.backends):
            processor._parallel_config = None
            processor._attention_backend = backend
        self.model._parallel_config = None

    def layout(self, args, kwargs) -> TokenLayout:
        return adapter_for(self.model).token_layout(args, kwargs)
