"""What every KV-cache term shares: the cache of a causal, chunk-wise video DiT and the
stand-in processors that let a bidirectional diffusers Wan transformer attend to it.

A stream (``cadence.stream``) generates a video chunk by chunk. Each chunk's tokens attend
bidirectionally to each other and to the keys and values of the earlier chunks the cache keeps
(block-causal attention, as CausVid and Self-Forcing run it). The model's source is not edited:
the self-attention processor of every block (``attn1``) is wrapped in a stand-in that runs the
original processor without its rotary embedding, under a ``TorchFunctionMode`` that answers its
``scaled_dot_product_attention`` call with the custom op ``cadence::kv_attention``. The op gets
the projected, normalised but *unrotated* Q, K, V of the current chunk (B, heads, tokens, dim);
it rotates Q and K at the current chunk's frame positions, reads the cached keys (stored before
RoPE) and rotates them at their re-indexed positions (:mod:`cadence.accel.sequence.rope`), and
attends to [cache, chunk]. In ``write`` mode it also keeps the chunk's unrotated K and V, which
``commit`` appends to the cache once the forward is done.

Positions never run out: the kept frames take positions 0..kept-1 in generation order, the
current chunk the next ones (KV-relative RoPE). Storing keys before RoPE costs one rotation of
the cached keys per attention call (elementwise, small beside the attention itself) and buys
free re-indexing: a key rotated once at write time would keep its absolute position forever
(Self-Forcing's rolling cache) or need un-rotating and re-rotating on eviction.

The policy (which frames stay: :mod:`cadence.accel.sequence.policies`) and the number format
(how they are stored: ``kv-format``, :mod:`cadence.accel.sequence.formats`) are two terms of the
``sequence`` level that share one cache per model; the stand-ins go when the last of them is
removed, and the model is then exactly as before. With nothing cached (the first chunk, or a
plain pipeline call) the stand-in computes what the model computes: the chunk alone, at
positions 0..F-1, rotated by the same elementwise operations.

Where this differs from Self-Forcing / CausVid: one timestep per chunk (not per frame), the
cache is per chunk and batch of the stream, and there is no cross-attention cache (Wan's
cross-attention to the text is cheap and recomputed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from cadence.accel.intercept import SDPAIntercept
from cadence.accel.registry import Handle, TechniqueConfig, param
from cadence.accel.sequence.formats import FORMATS, Stored, load
from cadence.accel.sequence.rope import rotary_tables, rotate

KV_CACHE = "_cadence_kv_cache"  # the model's attribute holding its KVCache while a term is applied
MODES = ("read", "write")


@dataclass(frozen=True)
class KVPolicyConfig(TechniqueConfig):
    """Base of the KV-cache policies: which generated frames the cache keeps."""

    level = "sequence"
    # The stand-ins read Python state (the cache) in an opaque custom op; a compiled block
    # sees only the op, so compiling the blocks is safe.
    compile_safe: ClassVar[bool] = True

    def keep(self, frames: list[int]) -> list[int]:
        """The frames (absolute indices, oldest first) still cached after ``frames`` were."""
        raise NotImplementedError

    @property
    def max_frames(self) -> int:
        """The most frames the cache ever holds."""
        raise NotImplementedError

    def check_chunk(self, frames_per_chunk: int) -> None:
        """Refuse a chunk size this policy cannot serve (a window shorter than one chunk)."""


@dataclass(frozen=True)
class KVFormatConfig(TechniqueConfig):
    name = "kv-format"
    level = "sequence"
    summary = "number format of the streaming KV cache: the model's own, bf16, or int8 / fp8 with a scale per token"

    format: str = param("native", "how cached keys and values are stored: native (the model's dtype, lossless), "
                                  "bf16, int8 (absmax per token and head) or fp8 (e4m3 with a scale per token and "
                                  "head); dequantized on read",
                        choices=tuple(FORMATS))


DEFAULT_FORMAT = KVFormatConfig()


# The caches alive now, by handle (a small int the compiled graph may hold; state stays here).
_CACHES: dict[int, KVCache] = {}


@torch.library.custom_op("cadence::kv_attention", mutates_args=())
def kv_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None,
                 handle: int, layer: torch.Tensor) -> torch.Tensor:
    """One self-attention call of a streamed chunk, opaque to ``torch.compile``. query, key,
    value: (B, H, tokens, dim), unrotated; layer: a 0-d int64 CPU tensor."""
    return _CACHES[handle].attend(int(layer), query, key, value, scale).contiguous()


@kv_attention.register_fake
def _(query, key, value, scale, handle, layer):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


class _Intercept(SDPAIntercept):
    """Answers one attention module's ``scaled_dot_product_attention`` call with the cache's op."""

    def attend(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None or dropout_p or is_causal or enable_gqa:
            raise ValueError(
                "the KV cache attends a chunk to its cache without masks; got "
                f"attn_mask={None if attn_mask is None else tuple(attn_mask.shape)}, dropout_p={dropout_p}, "
                f"is_causal={is_causal}, enable_gqa={enable_gqa}; valid: None, 0, False, False"
            )
        return kv_attention(query, key, value, scale, self.handle, self.layer)


class _Cached:
    """Stands in for a Wan block's self-attention processor: runs it without its rotary
    embedding (the cache rotates Q and K itself) under ``_Intercept``."""

    def __init__(self, processor, handle: int, layer: int):
        self.processor, self.handle, self.layer = processor, handle, torch.tensor(layer)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        with _Intercept(self.handle, self.layer):
            return self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, None)

    def __getattr__(self, name):  # the processor's own settings (_attention_backend, ...)
        if name == "processor":
            raise AttributeError(name)
        return getattr(self.processor, name)


def _check_native(module: torch.nn.Module) -> None:
    """The cache answers torch's scaled_dot_product_attention; another diffusers backend bypasses it."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    for backend in (getattr(module.processor, "_attention_backend", None), _AttentionBackendRegistry._active_backend):
        name = str(getattr(backend, "value", backend))
        if backend is not None and name != "native":
            raise ValueError(f"attention backend {name!r} bypasses torch's scaled_dot_product_attention, which the KV "
                             "cache answers; valid: diffusers' 'native' backend (set_attention_backend('native'))")


class KVCache:
    """The per-layer keys and values of the frames a stream keeps, for one model."""

    def __init__(self, model: torch.nn.Module):
        rope, blocks = getattr(model, "rope", None), getattr(model, "blocks", None)
        if rope is None or not hasattr(rope, "t_dim") or blocks is None:
            raise ValueError(
                f"the KV cache streams Wan transformers (WanTransformer3DModel); got {type(model).__name__}")
        if rope.patch_size[0] != 1:
            raise ValueError(f"patch_size={tuple(rope.patch_size)}: the KV cache keeps whole frames and needs a "
                             "temporal patch of 1; valid: (1, ph, pw)")
        self.modules = [block.attn1 for block in blocks]
        for module in self.modules:
            _check_native(module)
            # Another technique's stand-in (an attention technique, a KV cache) routes the same call.
            if not type(module.processor).__module__.startswith("diffusers."):
                raise ValueError(f"the model's self-attention processor is {type(module.processor).__name__}, not "
                                 "diffusers' own: it already has a cadence technique (an attention technique or a KV "
                                 "cache); remove it first, the KV cache routes the same call")
        self.model, self.rope = model, rope
        self.handle = next(i for i in range(len(_CACHES) + 1) if i not in _CACHES)
        _CACHES[self.handle] = self
        self.processors = [module.processor for module in self.modules]
        for layer, module in enumerate(self.modules):
            module.processor = _Cached(module.processor, self.handle, layer)
        self.layout_hook = model.register_forward_pre_hook(self._read_layout, with_kwargs=True)
        setattr(model, KV_CACHE, self)
        self.policy: KVPolicyConfig | None = None
        self.format_term: KVFormatConfig | None = None  # the kv-format term applied, if any
        self.users = 0
        self.mode = "read"
        self.patches: tuple[int, int] | None = None  # (height, width) in patches of the current call
        self.tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.reset()

    # -- state -----------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every cached frame (a new stream)."""
        layers = len(self.modules)
        self.keys: list[Stored | None] = [None] * layers
        self.values: list[Stored | None] = [None] * layers
        self.frames: list[int] = []  # absolute indices of the kept frames, oldest first
        self.written = 0  # frames ever committed: the next chunk's first absolute index
        self.staged: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; valid: {', '.join(MODES)}")
        self.mode = mode
        self.staged = {}

    def bytes(self) -> int:
        """Bytes the cached keys and values (and their scales) take."""
        return sum(s.nbytes() for s in (*self.keys, *self.values) if s is not None)

    @property
    def format(self) -> KVFormatConfig:
        return self.format_term or DEFAULT_FORMAT

    @property
    def max_position(self) -> int:
        return self.rope.max_seq_len

    # -- hooks -----------------------------------------------------------------------------
    def _read_layout(self, module, args, kwargs):
        hidden_states = kwargs.get("hidden_states", args[0] if args else None)  # (B, C, F, H, W)
        _, patch_h, patch_w = self.rope.patch_size
        self.patches = (hidden_states.shape[-2] // patch_h, hidden_states.shape[-1] // patch_w)

    def _tables(self, first: int, frames: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = self.patches
        key = (first, frames, height, width, device)
        if key not in self.tables:
            if first + frames > self.max_position:
                raise ValueError(
                    f"frame position {first + frames - 1} is past the rotary table of {self.max_position} positions "
                    f"(rope_max_seq_len): keep fewer frames in the cache (at most {self.max_position - frames})")
            positions = torch.arange(first, first + frames)
            self.tables[key] = tuple(t.to(device) for t in rotary_tables(self.rope, positions, height, width))
        return self.tables[key]

    # -- one attention call ----------------------------------------------------------------
    def attend(self, layer: int, query, key, value, scale) -> torch.Tensor:
        """query, key, value: (B, H, tokens, dim) of the current chunk, before RoPE. The cached
        keys are dequantized and rotated again on every call (each denoising step of a chunk, and
        its write pass), so the cache stays at its stored format's size; what that work costs at
        the real size is not measured yet (benchmarks/stream_realsize.py)."""
        batch, heads, tokens, dim = key.shape
        height, width = self.patches
        per_frame = height * width
        frames = tokens // per_frame
        kept = len(self.frames)
        cos, sin = self._tables(kept, frames, query.device)
        query, rotated = rotate(query, cos, sin), rotate(key, cos, sin)
        if self.mode == "write":
            self.staged[layer] = (key, value)
        if kept:
            if self.keys[layer].data.shape[0] != batch:
                raise ValueError(f"the cache holds a batch of {self.keys[layer].data.shape[0]}, this call has {batch}: "
                                 "a stream keeps one cache per batch (classifier-free guidance needs one per branch)")
            cached_cos, cached_sin = self._tables(0, kept, query.device)
            cached_key = load(self.keys[layer], key.dtype).reshape(batch, heads, kept * per_frame, dim)
            cached_value = load(self.values[layer], value.dtype).reshape(batch, heads, kept * per_frame, -1)
            rotated = torch.cat([rotate(cached_key, cached_cos, cached_sin), rotated], dim=2)
            value = torch.cat([cached_value, value], dim=2)
        return F.scaled_dot_product_attention(query, rotated, value, scale=scale)

    def commit(self) -> list[int]:
        """Append the chunk the last ``write`` forward saw to the cache, evict what the policy
        drops; return the absolute indices of the frames now kept."""
        if len(self.staged) != len(self.modules):
            raise RuntimeError(f"commit() after a write forward that reached {len(self.staged)} of "
                               f"{len(self.modules)} attention layers; run the model in write mode first")
        height, width = self.patches
        frames = self.staged[0][0].shape[2] // (height * width)
        new = list(range(self.written, self.written + frames))
        keep = self.policy.keep(self.frames + new) if self.policy is not None else self.frames + new
        kept = set(keep)
        index = torch.tensor([i for i, frame in enumerate(self.frames + new) if frame in kept], dtype=torch.long)
        store = FORMATS[self.format.format]
        for layer, (key, value) in self.staged.items():
            key_frames = store(key.unflatten(2, (frames, height * width)))  # (B, H, frames, tokens, dim)
            value_frames = store(value.unflatten(2, (frames, height * width)))
            key_all = key_frames if self.keys[layer] is None else self.keys[layer].append(key_frames)
            value_all = value_frames if self.values[layer] is None else self.values[layer].append(value_frames)
            self.keys[layer], self.values[layer] = key_all.select_frames(index), value_all.select_frames(index)
        self.frames, self.written = keep, self.written + frames
        self.set_mode("read")
        return list(keep)

    # -- terms -------------------------------------------------------------------------------
    def remove(self) -> None:
        for module, processor in zip(self.modules, self.processors):
            module.processor = processor
        self.layout_hook.remove()
        delattr(self.model, KV_CACHE)
        _CACHES.pop(self.handle, None)

    def stats(self) -> dict:
        return {"kv_bytes": self.bytes(), "kept_frames": list(self.frames), "written_frames": self.written}


def attach(model: torch.nn.Module) -> KVCache:
    """The model's KV cache, installed if it has none; one more term uses it."""
    cache = getattr(model, KV_CACHE, None) or KVCache(model)
    cache.users += 1
    return cache


def detach(cache: KVCache) -> None:
    cache.users -= 1
    if cache.users <= 0:
        cache.remove()


def apply_policy(model: torch.nn.Module, config: KVPolicyConfig) -> Handle:
    """Put ``config`` on the model's KV cache; the handle's ``remove()`` takes it off (and the
    stand-ins, with the last sequence term), restoring the model exactly."""
    return _hold(model, config, "policy", "already has the policy")


def apply_format(model: torch.nn.Module, config: KVFormatConfig) -> Handle:
    return _hold(model, config, "format_term", "is already stored as")


def _hold(model: torch.nn.Module, config, slot: str, holding: str) -> Handle:
    """``config`` in the cache's ``slot`` (one term each), refused while another holds it."""
    cache = attach(model)
    held = getattr(cache, slot)
    if held is not None:
        detach(cache)
        raise ValueError(f"cannot apply {config}: the model's KV cache {holding} {held}; remove it first")
    setattr(cache, slot, config)

    def remove():
        setattr(cache, slot, None)
        detach(cache)

    return Handle(config, remove, cache.stats)
