"""CFG parallelism: the conditional and unconditional forwards of a step at the same time,
on two halves of the ranks.

The pipeline still calls the transformer twice per step, first under
``cache_context("cond")`` then under ``cache_context("uncond")``, and combines the two
outputs only after the second call returns (diffusers' Wan and FLUX pipelines and cadence's
reference ones all do). So each half runs its own branch on the call that names it and
answers the other call at once:

- cond half: runs the cond call; on the uncond call it runs nothing, receives the uncond
  output from its partner in the other half and returns it;
- uncond half: answers the cond call with a placeholder (NaN, so a pipeline that reads it
  too early fails loudly), runs the uncond call, then receives the cond output and writes it
  into the placeholder in place before the pipeline combines them.

Both halves then hold both outputs, take the same scheduler step and stay in lockstep. The
placeholder's shape is learned once per input shape from the cond half (one exchange, the
only step of the run whose branches do not overlap).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from diffusers.models.modeling_outputs import Transformer2DModelOutput

HOOK = "cadence.parallel.cfg"
BRANCHES = ("cond", "uncond")


class _Unused(BaseState):
    def reset(self) -> None:  # diffusers sets the cache context only on hooks with a StateManager
        pass


def _sample(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.sample


def _with_sample(output, sample: torch.Tensor):
    if isinstance(output, tuple):
        return (sample, *output[1:])
    return Transformer2DModelOutput(sample=sample)


class CfgBranches(ModelHook):
    _is_stateful = True

    def __init__(self, branch: str, group: dist.ProcessGroup):
        super().__init__()
        self.branch, self.group = branch, group  # group: this rank and its partner, cond half first
        self.diffusers_state = StateManager(_Unused)
        self.shapes: dict[tuple, tuple[tuple[int, ...], torch.dtype]] = {}
        self.pending: tuple[torch.Tensor | None, object] | None = None  # (placeholder, cond output)

    def new_forward(self, module, *args, **kwargs):
        context = self.diffusers_state._context
        name = getattr(context, "name", None)
        if name not in BRANCHES:
            raise ValueError(
                f"parallel cfg=2 runs the two CFG branches of a step on two halves of the ranks, and needs a pipeline "
                f"that calls the transformer once per branch under cache_context('cond') and cache_context('uncond')"
                f"; this call runs under {name!r} (CogVideoX's pipeline batches both as 'cond_uncond'): use cfg=1")
        if name == "cond":
            return self._cond(module, args, kwargs)
        return self._uncond(module, args, kwargs)

    def _cond(self, module, args, kwargs):
        if self.pending is not None:
            raise ValueError("parallel cfg=2: two conditional forwards without an unconditional one between them; "
                             "CFG parallelism needs guidance on (guidance_scale > 1): use cfg=1 without CFG")
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        key = tuple(hidden.shape)
        if self.branch == "cond":
            output = self.fn_ref.original_forward(*args, **kwargs)
            if key not in self.shapes:
                sample = _sample(output)
                self.shapes[key] = (tuple(sample.shape), sample.dtype)
                dist.broadcast_object_list([self.shapes[key]], group_src=0, group=self.group)
            self.pending = (None, output)
            return output
        if key not in self.shapes:
            received = [None]
            dist.broadcast_object_list(received, group_src=0, group=self.group)
            self.shapes[key] = received[0]
        shape, dtype = self.shapes[key]
        placeholder = torch.full(shape, float("nan"), dtype=dtype, device=hidden.device)
        self.pending = (placeholder, None)
        return (placeholder,) if kwargs.get("return_dict", True) is False else Transformer2DModelOutput(sample=placeholder)

    def _uncond(self, module, args, kwargs):
        if self.pending is None:
            raise ValueError("parallel cfg=2: an unconditional forward with no conditional one before it")
        placeholder, cond_output = self.pending
        self.pending = None
        if self.branch == "uncond":
            output = self.fn_ref.original_forward(*args, **kwargs)
            mine = _sample(output)
        else:
            mine = _sample(cond_output)
        both = [torch.empty_like(mine) for _ in BRANCHES]
        dist.all_gather(both, mine.contiguous(), group=self.group)  # group rank 0: cond half, 1: uncond half
        cond, uncond = both
        if self.branch == "uncond":
            placeholder.copy_(cond)
            return output
        return _with_sample(cond_output, uncond)

    def reset_state(self, module):
        self.pending = None
        return module


def install(model: torch.nn.Module, branch: str, group: dist.ProcessGroup) -> CfgBranches:
    hook = CfgBranches(branch, group)
    HookRegistry.check_if_exists_or_initialize(model).register_hook(hook, HOOK)
    return hook


def remove(model: torch.nn.Module) -> None:
    HookRegistry.check_if_exists_or_initialize(model).remove_hook(HOOK, recurse=False)
