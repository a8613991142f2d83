"""KV caches for masked-diffusion decoding: Fast-dLLM's prefix and dual cache.

A diffusion LM runs a full bidirectional forward per step, yet between two steps only the
tokens of the block being decoded change. Fast-dLLM (Wu et al., 2025, Sec. 3.2) therefore
keeps the keys and values of the other tokens from one full forward and, on the following
steps, runs the model on the active tokens alone, their queries attending to the cached keys:

- ``prefix-cache``: the prompt and the finished blocks are cached; the current block and
  every position after it (still masked) are recomputed each step.
- ``dual-cache``: the masked suffix after the current block is cached too; only the current
  block is recomputed.

The cache is refreshed (one full forward, whose logits also decode that step) when a block
starts, and every ``refresh_every`` steps when that is set; ``refresh_every=1`` refreshes on
every step, which is the uncached model bit for bit. It is approximate otherwise: a cached
token's keys do not see the tokens committed since the refresh.

The cache is a hook on the model's forward (diffusers' ``ModelHook``): it answers every call,
from cadence's engine or from a pipeline the user already has (diffusers' ``LLaDA2Pipeline``),
by running the original forward on a slice of the tokens with a ``cache`` object that
transformers' attention hands its keys and values to (``cache.update(key, value, layer)``):
at a refresh it records them, between refreshes it splices the fresh keys of the active
tokens into the recorded ones. Outside the engine (no window known) the active tokens are
those from the first position still masked at the refresh to the end of the input: for
``LLaDA2Pipeline``, whose input ends with the block it decodes, that is the current block.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry, ModelHook

from cadence.accel.registry import param, register
from cadence.dllm.plan import install_term, plan_of
from cadence.dllm.policies import DllmTerm
from cadence.models.llada import dllm_family_of

HOOK = "cadence.dllm.kv-cache"


@dataclass(frozen=True)
class KVCacheConfig(DllmTerm):
    role = "cache"
    reuse_suffix = False

    refresh_every: int = param(0, "also refresh every N steps inside a block; 0: only when a block starts "
                                  "(Fast-dLLM); 1: every step, which is the uncached model", low=0)


@dataclass(frozen=True)
class PrefixCacheConfig(KVCacheConfig):
    name = "prefix-cache"
    summary = "reuse the keys and values of the prompt and finished blocks (Fast-dLLM prefix cache)"


@dataclass(frozen=True)
class DualCacheConfig(KVCacheConfig):
    name = "dual-cache"
    summary = "reuse the keys and values of everything outside the current block (Fast-dLLM dual cache)"
    reuse_suffix = True


class Record:
    """What transformers' attention calls ``cache.update`` on: at a refresh, keep the keys."""

    def __init__(self):
        self.keys, self.values = {}, {}

    def update(self, key, value, layer_idx, *args, **kwargs):  # (B, kv heads, tokens, head dim)
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value


class Splice:
    """Between refreshes: the recorded keys with the active tokens' fresh ones in their place."""

    def __init__(self, record: Record, start: int, end: int):
        self.record, self.start, self.end = record, start, end

    def update(self, key, value, layer_idx, *args, **kwargs):
        keys, values = self.record.keys[layer_idx], self.record.values[layer_idx]
        return (torch.cat((keys[:, :, :self.start], key, keys[:, :, self.end:]), dim=2),
                torch.cat((values[:, :, :self.start], value, values[:, :, self.end:]), dim=2))


def cache_keyword(module: torch.nn.Module) -> str:
    """``module``'s forward keyword for a KV cache: transformers renamed ``past_key_values`` to
    ``cache`` in its 5.2x releases (the GPU image has 5.17). A head model (``...ForMaskedLM``)
    may take it through ``**kwargs``: the first of its modules whose forward names one decides.
    Read once, when a cache is installed."""
    signatures = (inspect.signature(type(m).forward).parameters for m in module.modules())
    return next((name for parameters in signatures for name in ("cache", "past_key_values") if name in parameters),
                "past_key_values")


def split_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, tuple, bool]:
    """A model call's ``input_ids`` (popped from ``kwargs`` or first of ``args``), the other
    positional arguments, and whether a cache answers it: ids and keywords only, no cache of
    its own, no embeddings."""
    input_ids = kwargs.pop("input_ids", None) if "input_ids" in kwargs else (args[0] if args else None)
    args = args[1:] if args and input_ids is args[0] else args
    cached = input_ids is not None and not args and has_no_cache(kwargs) and kwargs.get("inputs_embeds") is None
    return input_ids, args, cached


def has_no_cache(kwargs: dict) -> bool:
    """Whether a call brings no KV cache of its own, under either of transformers' names."""
    return kwargs.get("cache") is None and kwargs.get("past_key_values") is None


def same_padding(mask: torch.Tensor | None, held: torch.Tensor | None) -> bool:
    """Whether an attention (padding) mask is the one the cache was made under."""
    return (mask is None) == (held is None) and (mask is None or torch.equal(mask, held))


class KVCacheHook(ModelHook):
    _is_stateful = True  # diffusers resets it at the end of a pipeline call

    def __init__(self, config: KVCacheConfig, model):
        super().__init__()
        self.config = config
        self.model = model
        self.cache_keyword = cache_keyword(model)
        self.mask_token_id = model.config.mask_token_id
        self.record: Record | None = None
        self.full_forwards = self.partial_forwards = self.computed_tokens = self.total_tokens = 0
        self.reset_state(model)

    def reset_state(self, module):
        self.record = None
        self.key = None  # what the recorded keys were computed for
        self.steps_since_refresh = 0
        return module

    def new_forward(self, module, *args, **kwargs):
        input_ids, args, cached = split_call(args, kwargs)
        if not cached:
            return self.fn_ref.original_forward(*args, input_ids=input_ids, **kwargs)
        attention_mask = kwargs.get("attention_mask")
        window, key = self._window_and_key(input_ids, attention_mask)
        self.total_tokens += input_ids.numel()
        if self._must_refresh(input_ids, attention_mask, window, key):
            return self._refresh(input_ids, kwargs, key)
        return self._cached_forward(input_ids, kwargs, window)

    def _active(self, input_ids, window) -> tuple[int, int]:
        """The canvas positions [start, end) a cached step recomputes."""
        if window is None:  # a pipeline's call: the active tokens run to the end of its input
            window = (self.pipeline_start, input_ids.shape[1])
        return window if self.config.reuse_suffix else (window[0], input_ids.shape[1])

    def _cached_forward(self, input_ids, kwargs, window):
        """The original forward on the active tokens, their keys spliced into the recorded ones."""
        start, end = self._active(input_ids, window)
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        sliced = {**kwargs, "position_ids": position_ids[:, start:end]}
        output = self.fn_ref.original_forward(input_ids=input_ids[:, start:end],
                                              **{self.cache_keyword: self._splice(start, end)}, **sliced)
        logits = self.logits.clone()  # (B, tokens, vocab): the refresh's rows outside [start, end)
        logits[:, start:end] = output.logits
        output.logits = logits
        self.steps_since_refresh += 1
        self.partial_forwards += 1
        self.computed_tokens += input_ids[:, start:end].numel()
        return output

    def _window_and_key(self, input_ids, attention_mask):
        plan = plan_of(self.model)
        if plan is not None and plan.window is not None:
            return plan.window, ("engine", plan.generation, plan.block_index, tuple(input_ids.shape))
        return None, ("pipeline", tuple(input_ids.shape))

    def _expired(self, key) -> bool:
        """Nothing recorded, recorded for another call, or refreshed ``refresh_every`` steps ago."""
        every = self.config.refresh_every
        return self.record is None or key != self.key or bool(every and self.steps_since_refresh + 1 >= every)

    def _must_refresh(self, input_ids, attention_mask, window, key) -> bool:
        if self._expired(key):
            return True
        if key[0] == "pipeline":  # no engine: refresh when anything before the active tokens changed
            start = self.pipeline_start
            same_mask = same_padding(attention_mask, self.attention_mask)
            return not (same_mask and torch.equal(input_ids[:, :start], self.input_ids[:, :start]))
        return False

    def _splice(self, start: int, end: int):
        """The cache object a cached step's attention calls (a subclass watches it)."""
        return Splice(self.record, start, end)

    def _refresh(self, input_ids, kwargs, key):
        record = Record()
        output = self.fn_ref.original_forward(input_ids=input_ids, **{self.cache_keyword: record}, **kwargs)
        self.record, self.key, self.logits = record, key, output.logits
        self.steps_since_refresh = 0
        self.full_forwards += 1
        self.computed_tokens += input_ids.numel()
        if key[0] == "pipeline":
            masked = (input_ids == self.mask_token_id).any(0).nonzero()
            self.pipeline_start = int(masked[0]) if len(masked) else input_ids.shape[1]
            self.input_ids, self.attention_mask = input_ids.clone(), kwargs.get("attention_mask")
            if self.attention_mask is not None:
                self.attention_mask = self.attention_mask.clone()
        return output

    def stats(self) -> dict:
        forwards = self.full_forwards + self.partial_forwards
        return {"full_forwards": self.full_forwards, "cached_forwards": self.partial_forwards,
                "compute_fraction": self.computed_tokens / self.total_tokens if self.total_tokens else None,
                "forwards": forwards}


def apply(model, config: KVCacheConfig):
    return apply_hook(model, config, KVCacheHook)


def apply_hook(model, config: KVCacheConfig, hook_class: type[KVCacheHook]):
    """Install ``hook_class`` (this module's hook or a subclass: cache_refresh.py) as the model's cache.
    A DiffusionGemma keeps its own prefix cache instead (:func:`cadence.dllm.gemma.apply_cache`)."""
    from cadence.dllm import gemma

    if dllm_family_of(model) is gemma.GEMMA:  # (refuses a model whose attention does not take a transformers cache)
        return gemma.apply_cache(model, config)
    hook = hook_class(config, model)

    def remove():
        HookRegistry.check_if_exists_or_initialize(model).remove_hook(HOOK, recurse=False)

    handle = install_term(model, "cache", config, on_remove=remove, stats=hook.stats)  # refuses a second cache
    HookRegistry.check_if_exists_or_initialize(model).register_hook(hook, HOOK)
    return handle


register(PrefixCacheConfig, apply)
register(DualCacheConfig, apply)
