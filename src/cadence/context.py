"""The step context: one object per transformer that tells every accelerator where the
denoising loop is (step index, timestep, number of steps, CFG branch, streaming chunk).

diffusers pipelines wrap each transformer call in ``transformer.cache_context(name, ...)``;
since diffusers 0.42 that context carries ``step_index`` and ``num_inference_steps`` too.
A hook on the transformer reads it before every forward and fills the shared
:class:`StepContext`, so a cache policy, an attention router and a precision selector
all see the same facts. Pipelines that give no step index still work: the step is then
inferred from the ``timestep`` argument (a new value is a new step; a larger value, that
is more noise, starts a new generation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

CONTEXT_HOOK = "cadence.context"


class Interceptor(Protocol):
    """A technique that acts on a whole transformer forward: it may answer the forward
    without running it (CFG reuse), or replace its output (ERTACache's output scale, the
    quantization's NaN check). Returning None leaves the forward, or its output, as is."""

    def before(self, context: "StepContext", args: tuple, kwargs: dict) -> Any | None: ...

    def after(self, context: "StepContext", output: Any) -> Any | None: ...


@dataclass
class StepContext:
    """The facts of the forward about to run. Techniques read the fields and subscribe
    through the methods; the context hook alone writes the fields."""

    step_index: int = -1
    timestep: float | torch.Tensor | None = None
    num_steps: int | None = None
    branch: str = "cond"  # "cond" / "uncond": the CFG branch of this forward
    scheduler: object = field(default=None, repr=False)  # the pipeline's, when accelerate() got a pipeline
    _generation_listeners: list[Callable[[], None]] = field(default_factory=list, repr=False)
    _interceptors: list[Interceptor] = field(default_factory=list, repr=False)

    def add_interceptor(self, interceptor: Interceptor, *, first: bool = False) -> None:
        """Run ``interceptor`` around every forward, after those added before it (or, with
        ``first``, before all of them: its ``after`` then sees the raw output first)."""
        self._interceptors.insert(0 if first else len(self._interceptors), interceptor)

    def remove_interceptor(self, interceptor: Interceptor) -> None:
        self._interceptors.remove(interceptor)

    @property
    def interceptors(self) -> tuple[Interceptor, ...]:
        return tuple(self._interceptors)

    def add_generation_listener(self, reset: Callable[[], None]) -> None:
        """Call ``reset()`` whenever a new generation starts (per-generation state is dropped)."""
        self._generation_listeners.append(reset)

    def remove_generation_listener(self, reset: Callable[[], None]) -> None:
        self._generation_listeners.remove(reset)

    def start_generation(self) -> None:
        self.step_index = -1
        self.timestep = None
        for reset in self._generation_listeners:
            reset()


class _Unused(BaseState):
    """diffusers sets the cache context only on hooks that own a StateManager."""

    def reset(self) -> None:
        pass


class _ContextHook(ModelHook):
    _is_stateful = True

    def __init__(self, context: StepContext):
        super().__init__()
        self.context = context
        self.diffusers_state = StateManager(_Unused)
        self.users = 0  # techniques sharing this hook; removed with the last one

    def new_forward(self, module, *args, **kwargs):
        self._update(kwargs)
        context = self.context
        interceptors = context.interceptors
        for interceptor in interceptors:
            output = interceptor.before(context, args, kwargs)
            if output is not None:
                return output
        output = self.fn_ref.original_forward(*args, **kwargs)
        for interceptor in interceptors:
            replaced = interceptor.after(context, output)
            if replaced is not None:
                output = replaced
        return output

    def _update(self, kwargs) -> None:
        context = self.context
        cache_context = self.diffusers_state._context
        timestep = kwargs.get("timestep")
        context.branch = cache_context.name if cache_context is not None else "cond"
        step_index = getattr(cache_context, "step_index", None)
        if step_index is not None:
            # The pipeline told us: no device sync needed to read the timestep.
            if step_index < context.step_index:
                context.start_generation()
            context.num_steps = getattr(cache_context, "num_inference_steps", None)
            context.step_index = step_index
            context.timestep = timestep
        else:
            # Most diffusers pipelines (FLUX, CogVideoX, HunyuanVideo, LTX) name the branch but
            # give no step count: the pipeline's scheduler knows it.
            timesteps = getattr(context.scheduler, "timesteps", None)
            context.num_steps = len(timesteps) if timesteps is not None else context.num_steps
            # max: conditioning pipelines (LTX) pin the first frame's tokens at t = 0
            value = float(timestep.max()) if torch.is_tensor(timestep) else timestep
            if value is not None and value != context.timestep:
                previous = context.timestep
                if previous is not None and value > previous:
                    context.start_generation()
                context.step_index += 1
                context.timestep = value
            elif value is None and context.branch == "cond":
                context.step_index += 1

    def reset_state(self, module):
        # Called by diffusers at the end of a pipeline call (maybe_free_model_hooks).
        self.context.start_generation()
        return module


def attach_context(transformer: torch.nn.Module) -> StepContext:
    """Return the transformer's step context, installing the hook that fills it."""
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    hook = registry.get_hook(CONTEXT_HOOK)
    if hook is None:
        hook = _ContextHook(StepContext())
        registry.register_hook(hook, CONTEXT_HOOK)
    hook.users += 1
    return hook.context


def detach_context(transformer: torch.nn.Module) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    hook = registry.get_hook(CONTEXT_HOOK)
    if hook is None:
        return
    hook.users -= 1
    if hook.users <= 0:
        registry.remove_hook(CONTEXT_HOOK, recurse=False)


def get_context(transformer: torch.nn.Module) -> StepContext | None:
    registry = getattr(transformer, "_diffusers_hook", None)
    hook = registry.get_hook(CONTEXT_HOOK) if registry is not None else None
    return hook.context if hook is not None else None
