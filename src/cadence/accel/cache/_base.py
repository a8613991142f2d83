"""What all step-reuse policies share: skipping the transformer's block stack.

On a computed step the stack runs and its residual (output minus input of the block
stack, per CFG branch) is kept. On a reused step the first block returns its input plus
that residual and every other block passes its input through, so no block runs; the
patch embedding, the condition embedding and the output head still run (they are a few
per cent of a forward). A policy only decides, per forward, whether to compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook

from cadence.context import StepContext, attach_context, detach_context
from cadence.models import adapter_for


@dataclass
class _BranchState:
    computing: bool = True
    hidden_in: torch.Tensor | None = None
    encoder_in: torch.Tensor | None = None
    residual: torch.Tensor | None = None  # (B, tokens, dim): stack output - stack input
    encoder_residual: torch.Tensor | None = None


class BlockStackReuse:
    """Installs the hooks; ``should_compute(context)`` is the policy."""

    def __init__(self, model: torch.nn.Module, hook_name: str, should_compute: Callable[[StepContext], bool]):
        adapter = adapter_for(model)
        if not adapter.blocks:
            raise ValueError(f"{type(model).__name__} has no transformer blocks to cache")
        self.model = model
        self.hook_name = hook_name
        self.should_compute = should_compute
        self.context = attach_context(model)
        self.context._on_new_generation.append(self.reset)
        self.states: dict[str, _BranchState] = {}
        self.computed_forwards = 0
        self.total_forwards = 0
        last = len(adapter.blocks) - 1
        for index, (block, metadata) in enumerate(zip(adapter.blocks, adapter.metadata)):
            hook = _StackHook(self, metadata, is_head=index == 0, is_tail=index == last)
            HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, hook_name)
        self.blocks = adapter.blocks

    def reset(self) -> None:
        self.states.clear()

    def state(self) -> _BranchState:
        return self.states.setdefault(self.context.branch, _BranchState())

    def begin_forward(self, state: _BranchState, hidden: torch.Tensor) -> None:
        # Nothing cached yet, or the shape changed (new resolution, CFG batch): compute.
        cached = state.residual is not None and state.residual.shape == hidden.shape
        state.computing = not cached or bool(self.should_compute(self.context))
        self.total_forwards += 1
        self.computed_forwards += state.computing

    def compute_fraction(self) -> float | None:
        return self.computed_forwards / self.total_forwards if self.total_forwards else None

    def stats(self) -> dict:
        return {"compute_fraction": self.compute_fraction(), "forwards": self.total_forwards}

    def remove(self) -> None:
        for block in self.blocks:
            HookRegistry.check_if_exists_or_initialize(block).remove_hook(self.hook_name, recurse=False)
        self.context._on_new_generation.remove(self.reset)
        detach_context(self.model)
        self.states.clear()


class _StackHook(ModelHook):
    def __init__(self, reuse: BlockStackReuse, metadata, is_head: bool, is_tail: bool):
        super().__init__()
        self.reuse = reuse
        self.metadata = metadata
        self.is_head = is_head
        self.is_tail = is_tail

    def new_forward(self, module, *args, **kwargs):
        metadata = self.metadata
        state = self.reuse.state()
        hidden = metadata._get_parameter_from_args_kwargs(metadata.hidden_states_argument_name, args, kwargs)
        encoder = None
        if metadata.return_encoder_hidden_states_index is not None:
            encoder = metadata._get_parameter_from_args_kwargs(
                metadata.encoder_hidden_states_argument_name, args, kwargs
            )
        if self.is_head:
            self.reuse.begin_forward(state, hidden)
        if not state.computing:
            if self.is_head:
                hidden = hidden + state.residual
                if encoder is not None:
                    encoder = encoder + state.encoder_residual
            return self._pack(hidden, encoder)

        if self.is_head:
            state.hidden_in, state.encoder_in = hidden, encoder
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.is_tail:
            out_hidden, out_encoder = self._unpack(output)
            state.residual = out_hidden - state.hidden_in
            if out_encoder is not None:
                state.encoder_residual = out_encoder - state.encoder_in
            state.hidden_in = state.encoder_in = None
        return output

    def _unpack(self, output):
        metadata = self.metadata
        if metadata.return_encoder_hidden_states_index is None:
            return (output[metadata.return_hidden_states_index] if isinstance(output, tuple) else output), None
        return output[metadata.return_hidden_states_index], output[metadata.return_encoder_hidden_states_index]

    def _pack(self, hidden, encoder):
        metadata = self.metadata
        if metadata.return_encoder_hidden_states_index is None:
            return hidden
        output = [None, None]
        output[metadata.return_hidden_states_index] = hidden
        output[metadata.return_encoder_hidden_states_index] = encoder
        return tuple(output)
