"""What every attention technique shares: the hook that puts cadence between a model's
attention processors and ``scaled_dot_product_attention``, the per-step and per-layer
choice of dense or sparse, and the statistics.

diffusers' attention processors (Wan, FLUX, SD3, CogVideoX, HunyuanVideo, LTX) project,
normalise and rotate Q and K, then call ``torch.nn.functional.scaled_dot_product_attention``
(through diffusers' "native" attention backend). A hook on each self- or joint-attention
module runs the module under a ``TorchFunctionMode`` that answers exactly that call, so
the processor's own code runs unchanged and removing the hook restores the model exactly.
Calls whose shape is not the model's joint sequence (cross-attention to text) stay dense.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from torch.overrides import TorchFunctionMode

from cadence.accel.attention import kernels
from cadence.accel.attention.block_mask import BlockSparse
from cadence.accel.attention.patterns import BLOCK_SIZES, Geometry
from cadence.accel.registry import Handle, TechniqueConfig, param
from cadence.context import StepContext, attach_context, detach_context
from cadence.models import TokenLayout, adapter_for

HOOK = "cadence.attention"
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
    block mask in ``pattern``."""

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

    def validate(self):
        self.require(self.backend != "triton" or kernels.triton_available(),
                     "backend='triton' needs the triton package; use 'flex' or 'auto'")

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

    def pattern(self, geometry: Geometry, density: float, query, key, scale) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The block mask over the pattern blocks, (1 or B, 1 or H, blocks, blocks) bool, and
        for head-classifying patterns the (B, H) index of each head's choice in
        ``choices``. query, key: (B, H, tokens, D) of the pattern blocks, in kernel order."""
        raise NotImplementedError

    choices: ClassVar[tuple[str, ...]] = ()


class _Intercept(TorchFunctionMode):
    """Answers the scaled_dot_product_attention call of one attention module."""

    def __init__(self, control: "AttentionControl", layer: int):
        super().__init__()
        self.control, self.layer = control, layer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self.control.attend(self.layer, *args, **kwargs)
        return func(*args, **kwargs)


class _AttentionHook(ModelHook):
    def __init__(self, control: "AttentionControl", layer: int):
        super().__init__()
        self.control, self.layer = control, layer

    # Outside any compiled graph: dynamo cannot trace a TorchFunctionMode entered inside it
    # (it breaks the graph at every op), and the control's per-call state would guard it.
    @torch.compiler.disable
    def new_forward(self, module, *args, **kwargs):
        with _Intercept(self.control, self.layer):
            return self.fn_ref.original_forward(*args, **kwargs)


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
            registry = HookRegistry.check_if_exists_or_initialize(module)
            if registry.get_hook(HOOK) is not None:
                raise ValueError(
                    f"{config.name}: the model already has an attention technique; remove it first "
                    "(one token-level technique per model)"
                )
        self.model, self.config, self.adapter, self.modules = model, config, adapter, modules
        self.layout: TokenLayout | None = None
        self.geometries: dict[TokenLayout, Geometry] = {}
        self.static_masks: dict[tuple, BlockSparse] = {}
        self.context = attach_context(model)
        self.context.add_interceptor(self)
        for layer, module in enumerate(modules):
            HookRegistry.check_if_exists_or_initialize(module).register_hook(_AttentionHook(self, layer), HOOK)
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
        query, key, value = (x.index_select(-2, order) for x in (query, key, value))
        if key_valid is not None:
            key_valid = key_valid.index_select(-1, order)
        sparse, choice = self.block_sparse(geometry, density, query, key, scale)
        output = kernels.attend(query, key, value, sparse, scale, key_valid, config.backend)

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

    def block_sparse(self, geometry, density, query, key, scale):
        config = self.config
        cache_key = (geometry.layout, density)
        if config.static and cache_key in self.static_masks:
            return self.static_masks[cache_key], None
        tokens = min(geometry.pattern_blocks * geometry.block, geometry.layout.tokens)
        pattern, choice = config.pattern(geometry, density, query[..., :tokens, :], key[..., :tokens, :], scale)
        sparse = BlockSparse(geometry.full_mask(pattern.to(query.device)), geometry.block, geometry.layout.tokens)
        if config.static:
            self.static_masks[cache_key] = sparse
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
        }
        if self.choice_counts:
            stats["heads"] = {name: int(count) for name, count in self.choice_counts.items()}
        return stats

    def remove(self) -> None:
        for module in self.modules:
            HookRegistry.check_if_exists_or_initialize(module).remove_hook(HOOK, recurse=False)
        self.context.remove_interceptor(self)
        detach_context(self.model)


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
