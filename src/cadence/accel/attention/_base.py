"""What every attention technique shares: the stand-in processor that puts cadence between
a model's attention processors and ``scaled_dot_product_attention``, the per-step and
per-layer choice of dense or sparse, and the statistics.

diffusers' attention processors (Wan, FLUX, SD3, CogVideoX, HunyuanVideo, LTX) project,
normalise and rotate Q and K, then call ``torch.nn.functional.scaled_dot_product_attention``
(directly, or through diffusers' "native" attention backend). Each self- or joint-attention
module's processor is wrapped in a stand-in that runs it under a ``TorchFunctionMode``
answering exactly that call with the custom op ``cadence::attention``; the processor's own
code runs unchanged, and ``remove()`` puts the original processor back, restoring the model
exactly. Calls whose shape is not the model's joint sequence (cross-attention to text) stay
dense.

One path, eager and compiled. Under ``torch.compile`` dynamo traces the mode and the
processor, so a compiled block is one graph with the projections, QK norms and RoPE in it,
and the op is opaque inside it: its inputs are the tensors, the call's plain arguments, the
application's handle (an int, the same for every layer) and the layer index as a 0-d CPU
tensor (a graph input, not a guard), so every block, layer and step runs the same graph.
The op looks the application up by its handle and runs ``AttentionControl.attend``
eagerly: the per-call Python state (step context, counters, mask caches, dynamic patterns'
masks built from Q and K) never enters the graph.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch

from cadence.accel.attention import kernels
from cadence.accel.attention.block_mask import BlockSparse
from cadence.accel.attention.patterns import BLOCK_SIZES, Geometry, pooled
from cadence.accel.intercept import SDPAIntercept
from cadence.accel.registry import Handle, TechniqueConfig, param
from cadence.context import StepContext, attach_context, detach_context
from cadence.models import TokenLayout, adapter_for

SCHEDULES = ("constant", "linear")


@dataclass(frozen=True)
class AttentionConfig(TechniqueConfig):
    """Base of the token-level techniques: each decides, per attention call, whether it
    runs dense (``density_at`` gives None) and on which dense backend."""

    level = "token"

    def density_at(self, context: StepContext, layer: int) -> float | None:
        return None

    @property
    def dense_backend(self) -> str:
        return "auto"


@dataclass(frozen=True)
class SparseAttentionConfig(AttentionConfig):
    """Parameters every sparse pattern shares. Subclasses add their own and build the
    block mask in ``pattern``.

    ``precision`` pairs the pattern with a number format (SpargeAttn, Zhang et al. 2025, runs
    its kept blocks on SageAttention's kernel, SageAttention2, Zhang et al. 2025): "int8" and
    "fp8" run the kept blocks with K smoothed, Q and K per tile in that format and P V in FP8
    (_sage_triton.sparse_sage_attention), and the dense steps, dense layers and
    cross-attention on the dense sage backend of the same format, so one setting covers all
    of the technique's attention. Where it differs from SpargeAttn: the mask is the pattern's
    (any of cadence's), not SpargeAttn's own prediction, and no kept block is skipped inside
    the kernel for a negligible P (its second filter), so the kept set is exactly the mask
    the statistics report. FlexAttention has no low-bit path: backend='flex' is refused."""

    # A mask that depends only on the layout and the density is built once and reused by
    # every layer and step; dynamic patterns (top-k, head classification) set False.
    static: ClassVar[bool] = True

    density: float = param(0.25, "share of video key blocks each query block attends; 1 = dense",
                           low=0, high=1, low_open=True)
    dense_fraction: float = param(0.2, "first steps, as a share of the run, attended densely (the layout forms early)",
                                  low=0, high=1)
    dense_layers: int = param(0, "first attention layers always dense", low=0)
    schedule: str = param("constant", "density over the sparse steps: constant, or linear from 1 down to `density`",
                          choices=SCHEDULES)
    block: int = param(128, "tokens per block side", choices=BLOCK_SIZES)
    backend: str = param("auto", "sparse kernel: auto (triton for bf16/fp16 on a GPU, else reference), flex, triton, "
                                 "reference", choices=kernels.BACKENDS)
    mask_every: int = param(1, "dynamic patterns: build each layer's block mask (per CFG branch) every N steps and "
                               "reuse it in between; 1 = every call", low=1)
    mask_drift: float = param(0.0, "with mask_every > 1: rebuild a held mask early once the layer's block-pooled "
                                   "queries or keys moved by more than this (relative L2) since it was built; 0 = the "
                                   "step count alone decides", low=0)
    precision: str = param("bf16", "number format of Q·K and P·V: bf16 (the model's own dtype), int8 (Q·K in INT8, "
                                   "P·V in FP8: SageAttention on the kept blocks, SpargeAttn style) or fp8 (both FP8); "
                                   "the dense steps and cross-attention take the same format",
                           choices=tuple(kernels.PRECISIONS))

    def validate(self):
        self.require(self.precision == "bf16" or self.backend != "flex",
                     f"precision={self.precision!r} with backend='flex': the low-bit kept blocks run on cadence's "
                     "sparse sage kernel; valid backends with it: auto, triton, reference (or precision='bf16')")
        self.require(self.precision == "bf16" or kernels.triton_available(),
                     f"precision={self.precision!r} needs the triton package; use precision='bf16'")
        self.require(self.backend != "triton" or kernels.triton_available(),
                     "backend='triton' needs the triton package; use 'flex' or 'auto'")
        self.require(self.mask_every == 1 or not self.static,
                     f"mask_every={self.mask_every}: {self.name}'s mask depends only on the layout and is built once; "
                     "mask_every applies to the dynamic patterns (sparse-topk, sparse-svg, sparse-router)")
        self.require(self.mask_drift == 0 or self.mask_every > 1,
                     f"mask_drift={self.mask_drift} refreshes a held mask, and with mask_every=1 none is held; set "
                     "mask_every > 1 (the longest a mask is reused) or mask_drift=0")

    def density_at(self, context: StepContext, layer: int) -> float | None:
        if layer < self.dense_layers:
            return None
        step, steps = context.step_index, context.num_steps
        if self.dense_fraction == 0 and self.schedule == "constant":
            return self.density
        if steps is None:
            raise ValueError(
                f"{self.name}: dense_fraction={self.dense_fraction} and schedule={self.schedule!r} need the "
                "number of steps; call through a diffusers pipeline (which gives it) or set dense_fraction=0"
            )
        dense_steps = round(self.dense_fraction * steps)
        if step < dense_steps:
            return None
        if self.schedule == "linear" and steps - dense_steps > 1:
            progress = (step - dense_steps) / (steps - dense_steps - 1)  # 0 at the first sparse step
            return 1 - (1 - self.density) * progress
        return self.density

    @property
    def dense_backend(self) -> str:
        """The dense calls (dense steps and layers, cross-attention) at the kept blocks' precision."""
        return kernels.PRECISIONS[self.precision]

    def pattern(self, geometry: Geometry, density: float, query, key, scale) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The block mask over the pattern blocks, (1 or B, 1 or H, blocks, blocks) bool, and
        for head-classifying patterns the (B, H) index of each head's choice in
        ``choices``. query, key: (B, H, tokens, D) of the pattern blocks, in kernel order."""
        raise NotImplementedError

    choices: ClassVar[tuple[str, ...]] = ()


# Set on a model by cadence.parallel under Ulysses: TokenLayout -> (tokens,) index, the
# position in the layout's own order of each token of an attention call, or None when they
# arrive in order. Each rank holds a slice of the text and of the video tokens; the
# all-to-all lays the ranks' [text, video] slices end to end, so a joint sequence arrives
# interleaved, and a sparse pattern must put it back in order to see the whole layout.
ARRIVAL = "_cadence_token_arrival"


# The applications alive now, by handle. The compiled graph holds only the handle (a small
# int, reused after remove(), so a new application passes the old graph's guards); the
# state of each call (step context, counters, mask caches) stays in the control, outside.
_CONTROLS: dict[int, AttentionControl] = {}


@torch.library.custom_op("cadence::attention", mutates_args=())
def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
              dropout_p: float, is_causal: bool, scale: float | None, enable_gqa: bool,
              handle: int, layer: torch.Tensor) -> torch.Tensor:
    """One attention call of a model under a cadence attention technique, opaque to
    ``torch.compile``. query, key, value: (B, H, tokens, D); layer: a 0-d int64 CPU tensor,
    so that every layer runs the same graph (an int would be guarded per layer)."""
    output = _CONTROLS[handle].attend(int(layer), query, key, value, attn_mask, dropout_p, is_causal, scale,
                                      enable_gqa=enable_gqa)
    return output.contiguous()


@attention.register_fake
def _(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, handle, layer):
    # Contiguous, whatever layout the kernel wrote: inductor lays the op's output out as
    # contiguous whatever strides this gives (torch 2.13), and SDPA returns the query's.
    return query.new_empty((*query.shape[:-1], value.shape[-1]))  # (B, H, tokens, D of value)


class _Intercept(SDPAIntercept):
    """Answers the scaled_dot_product_attention call of one attention module with
    ``cadence::attention``; every other call runs as it is."""

    def attend(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):
        return attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, self.handle,
                         self.layer)


class _Routed:
    """Stands in for one self- or joint-attention module's processor: runs the processor
    under ``_Intercept``. A processor, unlike a hook that replaces the module's ``forward``,
    is not guarded by identity in a compiled block, so every block shares one graph."""

    def __init__(self, processor, handle: int, layer: int):
        self.processor, self.handle, self.layer = processor, handle, torch.tensor(layer)

    def __call__(self, attn, *args, **kwargs):
        with _Intercept(self.handle, self.layer):
            return self.processor(attn, *args, **kwargs)

    def __getattr__(self, name):  # the processor's own settings (_attention_backend, ...)
        if name == "processor":
            raise AttributeError(name)
        return getattr(self.processor, name)


@functools.cache
def _routed_class(processor_class: type) -> type:
    """diffusers drops the keyword arguments its processor's ``__call__`` does not name
    (``inspect.signature``), so the stand-in shows the processor's signature."""
    call = functools.wraps(processor_class.__call__)(_Routed.__call__)
    return type(f"Routed{processor_class.__name__}", (_Routed,), {"__call__": call})


def _check_native(module: torch.nn.Module) -> None:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    chosen = getattr(getattr(module, "processor", None), "_attention_backend", None)
    active = _AttentionBackendRegistry._active_backend
    for backend in (chosen, active):
        name = str(getattr(backend, "value", backend))
        if backend is not None and name != "native":
            raise ValueError(
                f"attention backend {name!r} bypasses torch's scaled_dot_product_attention, which cadence's "
                "attention techniques replace; use diffusers' 'native' backend (set_attention_backend('native'))"
            )


class AttentionControl:
    """One application of an attention technique to one transformer."""

    def __init__(self, model: torch.nn.Module, config: AttentionConfig):
        adapter = adapter_for(model)
        modules = adapter.attention_modules()
        if not modules:
            raise ValueError(f"{type(model).__name__} has no self-attention modules cadence knows")
        for module in modules:
            _check_native(module)
            if getattr(module, "processor", None) is None:
                raise ValueError(
                    f"{config.name}: {type(module).__name__} has no attention processor; cadence's attention "
                    "techniques route the call a diffusers processor (module.processor) makes, as every diffusers "
                    "attention module has one"
                )
            if isinstance(module.processor, torch.nn.Module):
                raise ValueError(
                    f"{config.name}: {type(module.processor).__name__} is a module (trained weights, such as an "
                    "IP-Adapter's); cadence's attention techniques take diffusers' plain attention processors"
                )
            if type(module.processor).__module__ == "cadence.accel.sequence._base":
                raise ValueError(
                    f"{config.name}: the model streams with a KV cache, whose attention over [cached frames, chunk] "
                    "no token pattern models; valid beside the KV cache: attention-backend (a dense backend), "
                    "applied before or after it"
                )
            if isinstance(module.processor, _Routed):
                raise ValueError(
                    f"{config.name}: the model already has an attention technique; remove it first "
                    "(one token-level technique per model)"
                )
        self.model, self.config, self.adapter, self.modules = model, config, adapter, modules
        self.layout: TokenLayout | None = None
        self.geometries: dict[TokenLayout, Geometry] = {}
        self.static_masks: dict[tuple, BlockSparse] = {}
        # dynamic masks held for reuse (mask_every > 1): (layer, branch, layout, density, batch) ->
        # (step, mask, choice, the block-pooled queries and keys it was built from when mask_drift is set)
        self.held_masks: dict[tuple, tuple] = {}
        self.mask_builds = self.drift_rebuilds = 0
        self.context = attach_context(model)
        self.context.add_interceptor(self)
        self.context.add_generation_listener(self.held_masks.clear)
        self.handle = min(set(range(len(_CONTROLS) + 1)) - set(_CONTROLS))
        _CONTROLS[self.handle] = self
        self.processors = [module.processor for module in modules]
        for layer, (module, processor) in enumerate(zip(modules, self.processors)):
            module.processor = _routed_class(type(processor))(processor, self.handle, layer)
        self.sparse_calls = self.dense_calls = 0
        self.density_sum = self.work_sum = 0.0
        self.choice_counts = dict.fromkeys(getattr(config, "choices", ()), 0)
        self._warned = False

    # -- the step context's interceptor: read the layout before every transformer forward --
    def before(self, context, args, kwargs):
        self.layout = self.adapter.token_layout(args, kwargs)

    def after(self, context, output):
        return None

    # -- one attention call ------------------------------------------------------------
    def attend(self, layer, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        """query, key, value: (B, H, tokens, D), as scaled_dot_product_attention takes them."""
        config, layout = self.config, self.layout
        density = config.density_at(self.context, layer)
        joint = (
            layout is not None and query.shape[-2] == key.shape[-2] == layout.tokens
            and not is_causal and dropout_p == 0 and not kwargs.get("enable_gqa", False)
        )
        key_valid = _key_padding(attn_mask, query.shape[0], key.shape[-2]) if joint else None
        if joint and attn_mask is not None and key_valid is None:
            self._warn(f"attention mask of shape {tuple(attn_mask.shape)} is not a key padding mask")
            joint = False
        if not joint:  # cross-attention, or a call this technique does not model
            return kernels.dense(query, key, value, attn_mask, scale, config.dense_backend,
                                 dropout_p=dropout_p, is_causal=is_causal, **kwargs)
        if density is None or density >= 1:
            self.dense_calls += 1
            self.work_sum += 1.0
            return kernels.dense(query, key, value, attn_mask, scale, config.dense_backend, **kwargs)

        geometry = self.geometry(layout, config.block)
        device = query.device
        order = geometry.memo(("order", device), lambda: geometry.order.to(device))
        inverse = geometry.memo(("inverse", device), lambda: geometry.inverse.to(device))
        arrival = getattr(self.model, ARRIVAL, None)
        arrived = arrival(layout) if arrival is not None else None
        if arrived is not None:  # kernel order read from, and written back to, the arrival order
            order, inverse = geometry.memo(("arrival", device), lambda: (
                arrived.argsort()[geometry.order].to(device), geometry.inverse[arrived].to(device)))
        query, key, value = (x.index_select(-2, order) for x in (query, key, value))
        if key_valid is not None:
            key_valid = key_valid.index_select(-1, order)
        sparse, choice = self.block_sparse(geometry, density, query, key, scale, layer)
        output = kernels.attend(query, key, value, sparse, scale, key_valid, config.backend, config.precision)

        # Summed on the device and read in stats(): no host sync per attention call.
        blocks = geometry.pattern_blocks
        self.sparse_calls += 1
        self.density_sum = self.density_sum + sparse.mask[..., :blocks, :blocks].float().mean()
        self.work_sum = self.work_sum + sparse.mask.float().mean()
        if choice is not None:
            for index, name in enumerate(config.choices):
                self.choice_counts[name] = self.choice_counts[name] + (choice == index).sum()
        return output.index_select(-2, inverse)

    def geometry(self, layout: TokenLayout, block: int) -> Geometry:
        if layout not in self.geometries:
            self.geometries[layout] = Geometry(layout, block)
        return self.geometries[layout]

    def block_sparse(self, geometry, density, query, key, scale, layer: int):
        config = self.config
        cache_key = (geometry.layout, density)
        if config.static and cache_key in self.static_masks:
            return self.static_masks[cache_key], None
        step = self.context.step_index
        held_key = (layer, self.context.branch, geometry.layout, density, query.shape[0])
        held = self.held_masks.get(held_key) if config.mask_every > 1 else None
        tokens = min(geometry.pattern_blocks * geometry.block, geometry.layout.tokens)
        summary = None
        if config.mask_drift:  # what the mask was built from, block by block
            summary = tuple(pooled(x[..., :tokens, :], geometry.block) for x in (query, key))
        if held is not None and 0 <= step - held[0] < config.mask_every:
            if summary is None or _drift(summary, held[3]) <= config.mask_drift:
                return held[1], held[2]
            self.drift_rebuilds += 1
        pattern, choice = config.pattern(geometry, density, query[..., :tokens, :], key[..., :tokens, :], scale)
        sparse = BlockSparse(geometry.full_mask(pattern.to(query.device)), geometry.block, geometry.layout.tokens)
        self.mask_builds += 1
        if config.static:
            self.static_masks[cache_key] = sparse
        elif config.mask_every > 1:
            self.held_masks[held_key] = (step, sparse, choice, summary)
        return sparse, choice

    def _warn(self, reason: str) -> None:
        if not self._warned:
            warnings.warn(f"{self.config.name}: {reason}; that call runs dense", stacklevel=3)
            self._warned = True

    # -- handle ------------------------------------------------------------------------
    def stats(self) -> dict:
        calls = self.sparse_calls + self.dense_calls
        stats = {
            "sparse_calls": self.sparse_calls,
            "dense_calls": self.dense_calls,
            # kept / all video block pairs, over the sparse calls
            "density": float(self.density_sum) / self.sparse_calls if self.sparse_calls else 1.0,
            # attention work done over dense work, over every joint-attention call (dense
            # steps, dense layers and text blocks included): the ideal attention speedup is
            # its inverse
            "attention_fraction": float(self.work_sum) / calls if calls else 1.0,
            "mask_builds": self.mask_builds,
            "drift_rebuilds": self.drift_rebuilds,  # of the builds, those a drift brought forward
        }
        if self.choice_counts:
            stats["heads"] = {name: int(count) for name, count in self.choice_counts.items()}
        return stats

    def remove(self) -> None:
        for module, processor in zip(self.modules, self.processors):
            module.processor = processor
        self.context.remove_interceptor(self)
        self.context.remove_generation_listener(self.held_masks.clear)
        detach_context(self.model)
        _CONTROLS.pop(self.handle, None)


def _drift(now: tuple[torch.Tensor, ...], then: tuple[torch.Tensor, ...]) -> float:
    """How far the block-pooled queries and keys moved since a mask was built: the larger
    relative L2 change of the two (one host sync, on the steps a held mask would serve)."""
    return max(float((a - b).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(now, then))


def _key_padding(attn_mask, batch: int, tokens: int) -> torch.Tensor | None:
    """(B, tokens) bool from a boolean key padding mask (B, 1, 1, tokens), or None."""
    if attn_mask is None or attn_mask.dtype != torch.bool or attn_mask.dim() != 4:
        return None
    if attn_mask.shape[1] != 1 or attn_mask.shape[2] != 1 or attn_mask.shape[-1] != tokens:
        return None
    return attn_mask[:, 0, 0, :].expand(batch, tokens)


def install(model: torch.nn.Module, config: AttentionConfig) -> Handle:
    """Apply an attention technique; the handle's ``remove()`` restores the model exactly."""
    control = AttentionControl(model, config)
    return Handle(config, control.remove, control.stats)
