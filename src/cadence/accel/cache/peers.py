"""diffusers' own cache hooks as cadence techniques ("peers"), so that ``cadence bench``
runs them beside cadence's policies on identical inputs and on one yardstick.

Written against diffusers 0.42.1. Each peer enables the hook through
``model.enable_cache(<diffusers config>)`` and removes it with ``model.disable_cache()``.
The defaults are diffusers' recommendation: the example settings of
docs/source/en/optimization/cache.md where it gives them, else the config's defaults.

=====================  =======================================  ==============================
peer                   defaults (source)                        what a skip saves
=====================  =======================================  ==============================
diffusers-fbcache      threshold 0.05 (config default; the      whole blocks: every block but
                       guide's Qwen-Image example uses 0.2)     the first
diffusers-magcache     threshold 0.06, max_skip_steps 3,        whole blocks: all of them
                       retention_ratio 0.2 (config defaults);
                       ratios from cadence's calibration file
diffusers-taylorseer   cache_interval 5, max_order 1,           attention calls (forecast by a
                       disable_cache_before_step 3, factors     Taylor series); with
                       in bfloat16 (config defaults; the        modules=attention+ffn the
                       guide's FLUX.1-dev example waits 10)     feed-forward calls too
diffusers-fastercache  spatial skip 2 in t in (-1, 681),        self-attention calls
                       attention weight 0.3 (cache.md)          (extrapolated from the last two)
diffusers-pab          spatial skip 2 in t in (100, 800)        attention calls (last output
                       (cache.md)                               broadcast)
=====================  =======================================  ==============================

Known failures of the hooks on pipelines that, like diffusers' own Wan and FLUX pipelines
and cadence's reference pipelines, run the CFG branches as separate forwards under
``cache_context("cond")`` / ``("uncond")``, and what the peers do about them:

- TaylorSeer's default identifiers (``^blocks.*attn``, ``re.fullmatch``) match no Wan
  module (Wan names them ``attn1``/``attn2``): on Wan it silently does nothing. The peer
  derives the identifiers from the model: every attention child of a transformer block
  (``^blocks\\.\\d+\\.attn1$``, ...), which for FLUX is exactly diffusers' default.
- FasterCache, unless told ``is_guidance_distilled=True``, takes every forward to be a
  batch ``[uncond, cond]`` and ``chunk(2)``s it, in its block hooks and its denoiser hook:
  on a batch-1 forward that is ``IndexError`` at faster_cache.py:464 (Wan) / :470 (FLUX).
  Its CFG-Cache (``unconditional_batch_skip_range``) lives on that batch. The peer sets
  ``is_guidance_distilled=True``, which keeps the attention cache and turns CFG-Cache off
  (``uncond_skip_range=1``); CFG-Cache on a pipeline with separate CFG forwards is refused
  with the reason at the first forward, and for FLUX (token output, a layout diffusers'
  frequency split does not know) at apply. In that mode its block hook may skip on a
  module's first call, with nothing cached yet, when the timestep is already inside the
  skip range: ``TypeError: 'NoneType' object is not subscriptable`` at faster_cache.py:435
  (a callback that reads FLUX's ``timestep`` argument, t / 1000, is always inside). The
  peer gives the hooks the timestep on the 0-1000 scale, refuses a range that reaches
  t = 1000, and refuses a generation whose first forward lies inside the range.
- PAB and FasterCache keep their block state in one object per module, not per cache
  context: with separate CFG forwards the uncond forward reuses the attention the cond
  forward of the same step computed, and the cond branch never reuses its own. That is
  what a diffusers user gets, so it is the default here. With ``per_branch=true`` the peer
  gives each CFG branch its own state object,
  as the StateManager-based hooks (FBC, MagCache, TaylorSeer) have already, so each branch
  broadcasts its own attention across steps, which is what the methods describe;
  ``per_branch=false`` runs the shared state as diffusers ships it. On the tiny test Wan
  (20 steps, CFG 3) PAB's relative error to the baseline is 0.0087 shared and 0.0007 per
  branch at the same compute fraction (0.88).
- PAB and FasterCache need a ``current_timestep_callback``. The peer reads the timestep
  of each forward from the cache context (its ``timestep``, else ``sigma * 1000``), else
  from the transformer's ``timestep`` argument (times 1000 for FLUX, which is passed
  ``t / 1000``).
- MagCache counts steps itself and wraps at ``num_inference_steps``: the peer refuses a
  run whose step count differs from the one its ratios were set up for.

``compute_fraction`` is measured, not predicted: a counting hook sits innermost on every
attention and feed-forward module of every transformer block (for single-stream blocks
without a FeedForward module, like FLUX's, the MLP's ``proj_mlp``), so it sees only the
calls that really ran. The fraction is executed calls / (counted modules x transformer
forwards), each attention or feed-forward call weighted equally whatever its cost; the
embeddings, norms and output head that always run are not counted.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    HookRegistry,
    MagCacheConfig,
    ModelHook,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)
from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS, _ATTENTION_CLASSES, _FEEDFORWARD_CLASSES
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager

from cadence.accel import calibration
from cadence.accel.cache import magcache
from cadence.accel.cache.traces import interpolate
from cadence.accel.registry import Handle, TechniqueConfig, param, register
from cadence.models import find_family

COUNT_HOOK = "cadence.peer-count"
METER_HOOK = "cadence.peer-meter"

TAYLOR_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SEPARATE_CFG_BRANCHES = ("cond", "uncond")


# -- the modules whose calls are counted ----------------------------------------------
@dataclass
class WorkModule:
    name: str  # e.g. "blocks.3.attn1"
    pattern: str  # e.g. "^blocks\.\d+\.attn1$": the same child in every block of its list
    kind: str  # "attention" | "ffn"
    module: torch.nn.Module


def work_modules(model: torch.nn.Module) -> list[WorkModule]:
    """The attention and feed-forward modules of every transformer block, in the block
    lists diffusers' cache hooks recognise."""
    found = []
    for list_name, blocks in model.named_children():
        if list_name not in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS or not isinstance(blocks, torch.nn.ModuleList):
            continue
        for index, block in enumerate(blocks):
            children = dict(block.named_children())
            has_feedforward = any(isinstance(c, _FEEDFORWARD_CLASSES) for c in children.values())
            for child_name, child in children.items():
                if isinstance(child, _ATTENTION_CLASSES):
                    kind = "attention"
                elif isinstance(child, _FEEDFORWARD_CLASSES) or (child_name == "proj_mlp" and not has_feedforward):
                    kind = "ffn"
                else:
                    continue
                pattern = rf"^{re.escape(list_name)}\.\d+\.{re.escape(child_name)}$"
                found.append(WorkModule(f"{list_name}.{index}.{child_name}", pattern, kind, child))
    return found


def _patterns(modules: list[WorkModule], keep: Callable[[WorkModule], bool]) -> list[str]:
    return sorted({m.pattern for m in modules if keep(m)})


def _single_stream(module: WorkModule, modules: list[WorkModule]) -> bool:
    """In a block whose MLP is ``proj_mlp`` and whose ``proj_out`` projects attention and
    MLP together (FLUX's single-stream blocks)."""
    prefix = module.name.rsplit(".", 1)[0] + "."
    return any(m.name == prefix + "proj_mlp" for m in modules)


class _Count(ModelHook):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs


# -- the peer configs ------------------------------------------------------------------
@dataclass(frozen=True)
class PeerConfig(TechniqueConfig):
    """A diffusers cache hook. Level "step": a recipe holds it or one of cadence's step
    policies, not both (and diffusers allows one cache per model)."""

    level = "step"

    def diffusers_config(self, model: torch.nn.Module, peer: "_Peer") -> Any:
        """The diffusers config this peer runs; may set what ``peer`` checks per forward."""
        raise NotImplementedError


@dataclass(frozen=True)
class FirstBlockCachePeer(PeerConfig):
    name = "diffusers-fbcache"
    summary = ("diffusers' FirstBlockCache (peer): run the first block; reuse the others' residual while the "
               "first block's residual changes by less than threshold")

    threshold: float = param(0.05, "relative mean change of the first block's residual below which the other blocks "
                                   "are skipped (0 = always compute)", low=0)

    def diffusers_config(self, model, peer):
        return FirstBlockCacheConfig(threshold=self.threshold)


@dataclass(frozen=True)
class MagCachePeer(PeerConfig):
    name = "diffusers-magcache"
    summary = ("diffusers' MagCache (peer): skip the block stack while the accumulated error of the calibrated "
               "residual-magnitude ratios stays under threshold")

    threshold: float = param(0.06, "accumulated error budget before a compute", low=0)
    max_skip_steps: int = param(3, "most consecutive skipped steps (0 = never skip)", low=0)
    retention_ratio: float = param(0.2, "fraction of the first steps always computed", low=0, high=1)
    steps: int = param(0, "denoising steps of the run (0 = the calibration's); the ratios are resampled to it")
    calibration: str = param("", "cadence magcache calibration file (empty: the one beside the model)")

    def validate(self):
        self.require(self.steps == 0 or self.steps >= 2, f"steps={self.steps} must be >= 2, or 0 for the calibration's")

    def mag_ratios(self, model) -> tuple[list[float], int]:
        """-> (diffusers' mag_ratios: one per step, the first 1.0; number of steps). The
        conditional branch's curve, as the diffusers guide advises for sequential CFG."""
        data = calibration.load(model, "magcache", self.calibration)
        curve = data["ratios"]["cond"]  # the change into steps 1..N-1
        steps = self.steps or data["steps"]
        return [1.0] + interpolate(curve, steps), steps

    def diffusers_config(self, model, peer):
        ratios, steps = self.mag_ratios(model)
        peer.expected_steps = steps
        return MagCacheConfig(threshold=self.threshold, max_skip_steps=self.max_skip_steps,
                              retention_ratio=self.retention_ratio, num_inference_steps=steps, mag_ratios=ratios)


@dataclass(frozen=True)
class TaylorSeerPeer(PeerConfig):
    name = "diffusers-taylorseer"
    compile_safe = False  # hooks the attention (and feed-forward) modules inside the blocks
    summary = ("diffusers' TaylorSeerCache (peer): compute every cache_interval-th step, forecast the attention "
               "(and optionally feed-forward) outputs between by a Taylor series")

    cache_interval: int = param(5, "compute every N-th step after the warm-up (1 = always)", low=1)
    max_order: int = param(1, "Taylor order of the forecast (0 = plain reuse)", low=0, high=4)
    disable_cache_before_step: int = param(3, "first steps always computed", low=1, why=(
        "a forecast needs a computed step (diffusers raises 'Cannot predict without prior initialization')"))
    disable_cache_after_step: int = param(-1, "steps from this one on always computed (-1 = none)", low=-1)
    taylor_factors_dtype: str = param("bfloat16", "dtype of the stored Taylor factors", choices=tuple(TAYLOR_DTYPES))
    modules: str = param("attention", "what is forecast: attention (diffusers' default) or attention+ffn (the "
                                      "paper's layout)", choices=("attention", "attention+ffn"))

    def identifiers(self, model) -> tuple[list[str], list[str]]:
        """-> (cache_identifiers, skip_predict_identifiers) for this model. Attention: every
        attention child of a block. attention+ffn adds the feed-forward modules; in a
        single-stream block (FLUX) attention and proj_mlp only feed proj_out, so, as in the
        paper's FLUX code, proj_out's output is forecast and they return zeros meanwhile."""
        modules = work_modules(model)
        if self.modules == "attention":
            return _patterns(modules, lambda m: m.kind == "attention"), []
        single = {m.pattern for m in modules if _single_stream(m, modules)}
        cache = _patterns(modules, lambda m: m.pattern not in single)
        skip = sorted(single)
        if single:
            cache += sorted({p.rsplit(r"\.", 1)[0] + r"\.proj_out$" for p in single})
        return cache, skip

    def diffusers_config(self, model, peer):
        cache, skip = self.identifiers(model)
        if not cache:
            raise ValueError(f"{self.name}: {type(model).__name__} has no attention modules in its transformer blocks")
        return TaylorSeerCacheConfig(
            cache_interval=self.cache_interval, disable_cache_before_step=self.disable_cache_before_step,
            disable_cache_after_step=None if self.disable_cache_after_step < 0 else self.disable_cache_after_step,
            max_order=self.max_order, taylor_factors_dtype=TAYLOR_DTYPES[self.taylor_factors_dtype],
            cache_identifiers=cache, skip_predict_identifiers=skip or None,
        )


# The first step of a full schedule is at t = 1000; a skip range that contains it makes
# diffusers' FasterCache skip with nothing cached (see the note above).
FIRST_TIMESTEP = 1000


@dataclass(frozen=True)
class FasterCachePeer(PeerConfig):
    name = "diffusers-fastercache"
    compile_safe = False  # hooks the attention (and feed-forward) modules inside the blocks
    summary = ("diffusers' FasterCache (peer): compute self-attention every N-th step inside a timestep range, "
               "extrapolate it from the last two in between")

    spatial_skip_range: int = param(2, "compute self-attention every N-th step inside the range (1 = always)", low=1)
    timestep_skip_high: int = param(681, "attention is skipped at timesteps in (-1, this); must stay below the first "
                                         "step's 1000", low=-1, high=FIRST_TIMESTEP, low_open=True,
                                    why="diffusers' FasterCache fails (TypeError) when the first step falls inside "
                                        "the skip range")
    attention_weight: float = param(0.3, "w in output = o_t + w (o_t - o_t-1) on skipped calls", low=0)
    uncond_skip_range: int = param(1, "CFG-Cache: compute the uncond branch every N-th step (1 = off; diffusers' guide "
                                      "uses 5, which needs [uncond, cond] batched in one forward)", low=1)
    uncond_timestep_skip_high: int = param(781, "CFG-Cache skips the uncond branch at timesteps in (-1, this)",
                                           low=-1, high=FIRST_TIMESTEP, low_open=True)
    per_branch: bool = param(False, "one attention cache per CFG branch (default false: diffusers' shared one, as "
                                    "shipped; see peers.py)")

    def diffusers_config(self, model, peer):
        cfg_cache = self.uncond_skip_range > 1
        family = type(model).__name__
        known = find_family(family)  # tensor_format: the output layout CFG-Cache splits frame by frame
        tensor_format = known.tensor_format if known else None
        if cfg_cache and tensor_format is None:
            raise ValueError(
                f"{self.name}: uncond_skip_range={self.uncond_skip_range} (CFG-Cache) splits the transformer output "
                f"into per-frame frequency bands; diffusers 0.42 knows the layouts BCFHW, BFCHW and BCHW, and "
                f"{family}'s output is not one cadence can name. Use uncond_skip_range=1")
        if cfg_cache:
            peer.refuse_separate_cfg = (
                f"{self.name}: uncond_skip_range={self.uncond_skip_range} (CFG-Cache) needs the pipeline to run both "
                "CFG branches in one batched forward ([uncond, cond], cache_context 'cond_uncond'); this pipeline "
                "runs them as separate forwards (cache_context 'cond' / 'uncond'), which diffusers' FasterCache "
                "cannot split (IndexError in faster_cache.py). Use uncond_skip_range=1")
        elif self.per_branch:
            peer.per_branch_hook = "faster_cache_block"
        peer.cold_skip_range = (-1, self.timestep_skip_high)
        peer.needs_timestep = True
        weight = self.attention_weight
        return FasterCacheConfig(
            spatial_attention_block_skip_range=self.spatial_skip_range,
            spatial_attention_timestep_skip_range=(-1, self.timestep_skip_high),
            attention_weight_callback=lambda _module: weight,
            unconditional_batch_skip_range=self.uncond_skip_range,
            unconditional_batch_timestep_skip_range=(-1, self.uncond_timestep_skip_high),
            tensor_format=tensor_format or "BCFHW",
            # "Distilled" only tells FasterCache that no forward holds an [uncond, cond] batch.
            is_guidance_distilled=not cfg_cache,
            current_timestep_callback=peer.current_timestep,
        )


@dataclass(frozen=True)
class PyramidAttentionBroadcastPeer(PeerConfig):
    name = "diffusers-pab"
    compile_safe = False  # hooks the attention (and feed-forward) modules inside the blocks
    summary = ("diffusers' PyramidAttentionBroadcast (peer): inside a timestep range, compute each attention every "
               "N-th step and broadcast its last output in between")

    spatial_skip_range: int = param(2, "self-attention computed every N-th step in the range (1 = always, 0 = not "
                                       "hooked)", low=0)
    temporal_skip_range: int = param(0, "temporal attention, likewise (0 = not hooked; Wan and FLUX have none)", low=0)
    cross_skip_range: int = param(0, "cross-attention, likewise (0 = not hooked)", low=0)
    timestep_skip_low: int = param(100, "attention may be skipped at timesteps > this")
    timestep_skip_high: int = param(800, "... and < this")
    per_branch: bool = param(False, "one attention cache per CFG branch (default false: diffusers' shared one, as "
                                    "shipped; see peers.py)")

    def validate(self):
        self.require(self.spatial_skip_range or self.temporal_skip_range or self.cross_skip_range,
                     "at least one of spatial/temporal/cross_skip_range must be >= 1")
        self.require(self.timestep_skip_low < self.timestep_skip_high,
                      f"timestep_skip_low={self.timestep_skip_low} must be below "
                      f"timestep_skip_high={self.timestep_skip_high}")

    def diffusers_config(self, model, peer):
        peer.needs_timestep = True
        if self.per_branch:
            peer.per_branch_hook = "pyramid_attention_broadcast"
        window = (self.timestep_skip_low, self.timestep_skip_high)
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=self.spatial_skip_range or None,
            temporal_attention_block_skip_range=self.temporal_skip_range or None,
            cross_attention_block_skip_range=self.cross_skip_range or None,
            spatial_attention_timestep_skip_range=window,
            temporal_attention_timestep_skip_range=window,
            cross_attention_timestep_skip_range=window,
            current_timestep_callback=peer.current_timestep,
        )


# -- applying one ------------------------------------------------------------------------
class _NoState(BaseState):
    """diffusers hands the cache context only to hooks that own a StateManager."""

    def reset(self) -> None:
        pass


class _Meter(ModelHook):
    """Outermost hook on the transformer: counts forwards, reads the cache context and the
    timestep before any diffusers hook needs them, and runs the peer's per-forward checks."""

    _is_stateful = True

    def __init__(self, peer: "_Peer"):
        super().__init__()
        self.peer = peer
        self.diffusers_state = StateManager(_NoState)

    def new_forward(self, module, *args, **kwargs):
        self.peer.before_forward(self.diffusers_state._context, kwargs)
        return self.fn_ref.original_forward(*args, **kwargs)

    def reset_state(self, module):
        self.peer.start_generation()
        return module


class _Peer:
    """One application of a peer to one transformer."""

    def __init__(self, model: torch.nn.Module, config: PeerConfig):
        name = config.name
        if not hasattr(model, "enable_cache"):
            raise ValueError(f"{name}: {type(model).__name__} has no diffusers enable_cache (it is not a CacheMixin)")
        if getattr(model, "is_cache_enabled", False):
            raise ValueError(f"{name}: {type(model).__name__} already has a diffusers cache enabled "
                             f"({type(model._cache_config).__name__}); diffusers allows one")
        self.model, self.config = model, config
        self.modules = work_modules(model)
        if not self.modules:
            raise ValueError(f"{name}: found no attention or feed-forward modules in {type(model).__name__}'s blocks")
        self.forwards = 0
        self.timestep: float | None = None
        # Set by the config's diffusers_config, checked per forward.
        self.expected_steps: int | None = None
        self.refuse_separate_cfg: str | None = None
        self.cold_skip_range: tuple[float, float] | None = None
        self.needs_timestep = False
        self.per_branch_hook: str | None = None
        self.branch_states: dict[Any, dict[int, Any]] = {}

        self.counters = []
        for work in self.modules:  # before the cache hooks: innermost, they see only real calls
            counter = _Count()
            HookRegistry.check_if_exists_or_initialize(work.module).register_hook(counter, COUNT_HOOK)
            self.counters.append(counter)
        try:
            model.enable_cache(config.diffusers_config(model, self))
        except BaseException:
            self._remove_counters()
            raise
        self.branch_hooks = []
        if self.per_branch_hook:
            for module in model.modules():
                hook = getattr(module, "_diffusers_hook", None)
                hook = hook.get_hook(self.per_branch_hook) if hook is not None else None
                if hook is not None:
                    self.branch_hooks.append(hook)
        HookRegistry.check_if_exists_or_initialize(model).register_hook(_Meter(self), METER_HOOK)

    # -- per forward ---------------------------------------------------------------------
    def current_timestep(self) -> float:
        if self.timestep is None:
            raise RuntimeError(
                f"{self.config.name}: the timestep of this forward is unknown; call the transformer with "
                "timestep=..., or inside transformer.cache_context(name, timestep=...)")
        return self.timestep

    def _read_timestep(self, context: CacheContext | None, kwargs) -> float | None:
        if context is not None and context.timestep is not None:
            return float(torch.as_tensor(context.timestep).max())
        if context is not None and context.sigma is not None:
            return float(context.sigma) * 1000  # flow matching: t = 1000 sigma
        timestep = kwargs.get("timestep")
        if timestep is None:
            return None
        family = find_family(type(self.model).__name__)  # timestep_scale: back to diffusers' 0-1000
        return float(torch.as_tensor(timestep).max()) * (family.timestep_scale if family else 1.0)

    def before_forward(self, context: CacheContext | None, kwargs) -> None:
        name = self.config.name
        branch = context.name if context is not None else None
        if self.refuse_separate_cfg and branch in SEPARATE_CFG_BRANCHES:
            raise ValueError(self.refuse_separate_cfg)
        steps = getattr(context, "num_inference_steps", None)
        if self.expected_steps is not None and steps is not None and steps != self.expected_steps:
            raise ValueError(
                f"{name}: set up for {self.expected_steps} denoising steps but the pipeline runs {steps}; "
                f"diffusers' MagCache counts steps itself, so pass steps={steps}")
        if self.needs_timestep:
            self.timestep = self._read_timestep(context, kwargs)
        fresh = branch not in self.branch_states
        states = self.branch_states.setdefault(branch, {})
        if fresh and self.cold_skip_range and self.timestep is not None:
            low, high = self.cold_skip_range
            if low < self.timestep < high:
                raise ValueError(
                    f"{name}: the first forward is at timestep {self.timestep:g}, inside the attention skip range "
                    f"({low:g}, {high:g}); diffusers' FasterCache would skip with nothing cached (TypeError at "
                    f"faster_cache.py:435). Lower timestep_skip_high to {math.floor(self.timestep)} or less")
        for hook in self.branch_hooks:
            if id(hook) not in states:
                states[id(hook)] = type(hook.state)()
            hook.state = states[id(hook)]
        self.forwards += 1

    def start_generation(self) -> None:
        self.branch_states.clear()

    # -- the handle ----------------------------------------------------------------------
    def compute_fraction(self) -> float | None:
        slots = len(self.counters) * self.forwards
        return sum(c.calls for c in self.counters) / slots if slots else None

    def stats(self) -> dict:
        return {"compute_fraction": self.compute_fraction(), "forwards": self.forwards}

    def _remove_counters(self) -> None:
        for work in self.modules:
            HookRegistry.check_if_exists_or_initialize(work.module).remove_hook(COUNT_HOOK, recurse=False)

    def remove(self) -> None:
        HookRegistry.check_if_exists_or_initialize(self.model).remove_hook(METER_HOOK, recurse=False)
        self.model.disable_cache()
        self._remove_counters()
        self.branch_states.clear()


def apply(model: torch.nn.Module, config: PeerConfig) -> Handle:
    peer = _Peer(model, config)
    return Handle(config, peer.remove, peer.stats)


PEERS: tuple[type[PeerConfig], ...] = (
    FirstBlockCachePeer, MagCachePeer, TaylorSeerPeer, FasterCachePeer, PyramidAttentionBroadcastPeer)
for _config in PEERS:
    # diffusers' MagCache reads the magnitude curve cadence's MagCache calibrates.
    register(_config, apply, magcache.CALIBRATION if _config is MagCachePeer else None)

__all__ = ["PEERS", "PeerConfig", "FirstBlockCachePeer", "MagCachePeer", "TaylorSeerPeer", "FasterCachePeer",
           "PyramidAttentionBroadcastPeer", "apply", "work_modules"]
