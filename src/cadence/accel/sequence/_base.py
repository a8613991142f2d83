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
current chunk the next ones (KV-relative RoPE). A policy may also keep evicted frames pooled
(``kv-pack``, :mod:`cadence.accel.sequence.pack`): fewer tokens a frame, in a second store, each
pooled frame at its own temporal position between the whole frames before and after it, its
tokens at their patches' centres. Storing keys before RoPE costs one rotation of
the cached keys per attention call (elementwise; its share of a step is not measured apart) and buys
free re-indexing: a key rotated once at write time would keep its absolute position forever
(Self-Forcing's rolling cache) or need un-rotating and re-rotating on eviction.

The policy (which frames stay: :mod:`cadence.accel.sequence.policies`), the number format
(how they are stored: ``kv-format``, :mod:`cadence.accel.sequence.formats`) and the frame
selection (which of them each call reads: ``kv-sparse``, :mod:`cadence.accel.sequence.sparse`,
which keeps a mean key per cached frame beside the cache to score it) are terms of the
``sequence`` level that share one cache per model; the stand-ins go when the last of them is
removed, and the model is then exactly as before. With nothing cached (the first chunk, or a
plain pipeline call) the stand-in computes what the model computes: the chunk alone, at
positions 0..F-1, rotated by the same elementwise operations.

The token level's dense ``attention-backend`` term runs inside the cache: its backend answers the
cache's call over [cache, chunk] (:mod:`cadence.accel.sequence.backend`), whichever of the two
was applied first; sparse token patterns are refused beside the cache.

Where this differs from Self-Forcing / CausVid: one timestep per chunk (not per frame), the
cache is per chunk and batch of the stream, and there is no cross-attention cache (Wan's
cross-attention to the text is cheap and recomputed).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch

from cadence.accel.intercept import SDPAIntercept
from cadence.accel.registry import Handle, TechniqueConfig, param
from cadence.accel.sequence import backend as dense_backend
from cadence.accel.sequence.formats import FORMATS, INT4_GROUPS, Stored, int4_group, load
from cadence.accel.sequence.rope import rotary_tables, rotary_tables_at, rotate

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

    def keep_pooled(self, frames: list[int]) -> list[int]:
        """The frames kept pooled (absolute indices, oldest first) out of ``frames``: those pooled
        already, then those ``keep`` just evicted. The default pools none: evicted frames go."""
        return []

    def pool(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """x: (B, H, frames, height * width, dim) -> (B, H, frames, pooled tokens, dim)."""
        raise NotImplementedError(f"{self.name} keeps no pooled frames")

    def pooled_grid(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, columns) of every pooled token, in patches (multiples of 1/2)."""
        raise NotImplementedError(f"{self.name} keeps no pooled frames")


@dataclass(frozen=True)
class KVFormatConfig(TechniqueConfig):
    name = "kv-format"
    level = "sequence"
    summary = ("number format of the streaming KV cache: the model's own, bf16, int8 / fp8 with a scale per token, "
               "or int4 with a scale and offset per group")

    format: str = param("native", "how cached keys and values are stored: native (the model's dtype, lossless), "
                                  "bf16, int8 (absmax per token and head), fp8 (e4m3 with a scale per token and "
                                  "head), int4 or int4-g64 (asymmetric, a scale and offset per 32 or 64 numbers of "
                                  "the head dim, two a byte); dequantized on read",
                        choices=tuple(FORMATS))

    def store(self, x: torch.Tensor) -> Stored:
        """x: (B, H, frames, tokens, dim) in this format."""
        return FORMATS[self.format](x)

    def check_model(self, head_dim: int) -> None:
        """Refuse a head dim this format cannot store."""
        if self.format in INT4_GROUPS:
            try:
                int4_group(head_dim, INT4_GROUPS[self.format])
            except ValueError as error:
                self.require(False, str(error))


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

    def __init__(self, below, handle: int, layer: int):
        self.handle, self.layer = handle, torch.tensor(layer)
        self.place(below)

    def place(self, below) -> None:
        """Stand over ``below`` (what ``remove`` puts back): diffusers' processor, or the stand-in
        of a dense ``attention-backend`` term, whose diffusers processor then runs here without
        the term's intercept while the cache's call takes the term's backend (one intercept a call)."""
        backend = dense_backend.backend_beneath(below)  # refuses a sparse pattern's stand-in
        self.below, self.backend = below, backend
        self.processor = below if backend is None else below.processor

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        with _Intercept(self.handle, self.layer):
            return self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, None)

    def __getattr__(self, name):  # the processor's own settings (_attention_backend, ...)
        if name in ("processor", "below"):
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
            # Another technique's stand-in routes the same call; a dense backend term's goes beneath.
            dense_backend.backend_beneath(module.processor)
        self.model, self.rope = model, rope
        self.handle = next(i for i in range(len(_CACHES) + 1) if i not in _CACHES)
        _CACHES[self.handle] = self
        self.stand_ins = [_Cached(module.processor, self.handle, layer) for layer, module in enumerate(self.modules)]
        for module, stand_in in zip(self.modules, self.stand_ins):
            module.processor = stand_in
        self.layout_hook = model.register_forward_pre_hook(self._read_layout, with_kwargs=True)
        setattr(model, KV_CACHE, self)
        self.policy: KVPolicyConfig | None = None
        self.format_term: KVFormatConfig | None = None  # the kv-format term applied, if any
        self._sparse_term = None  # the kv-sparse term applied, if any (sparse_term)
        self.sparse_reads = [0, 0]  # cached frames read, cached frames held, summed over the calls since it came
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
        self.pooled_keys: list[Stored | None] = [None] * layers  # frames the policy keeps pooled
        self.pooled_values: list[Stored | None] = [None] * layers
        self.pooled: list[int] = []  # their absolute indices, oldest first
        self.written = 0  # frames ever committed: the next chunk's first absolute index
        self.staged: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # kv-sparse's mean key of every kept whole frame, (B, H, frames, dim) float32, while it is applied
        self.summaries: list[torch.Tensor | None] = [None] * layers

    @property
    def sparse_term(self):
        """The kv-sparse term (a ``SparseConfig``) choosing the frames each call reads, or None."""
        return self._sparse_term

    @sparse_term.setter
    def sparse_term(self, term) -> None:
        """Put on or take off the frame selection; its summaries and read counts start afresh."""
        self._sparse_term = term
        self.summaries = [None] * len(self.modules)
        self.sparse_reads = [0, 0]

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; valid: {', '.join(MODES)}")
        self.mode = mode
        self.staged = {}

    def bytes(self) -> int:
        """Bytes the cached keys and values (and their scales) take."""
        stores = (*self.keys, *self.values, *self.pooled_keys, *self.pooled_values)
        return (sum(s.nbytes() for s in stores if s is not None)
                + sum(s.nbytes for s in self.summaries if s is not None))

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

    def _tables(self, first: int, frames: int, device, pooled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables of ``frames`` frames at positions first.., whole or pooled (by the
        policy's grid: the policy is part of the key, as another may take its place)."""
        height, width = self.patches
        key = (first, frames, height, width, device, self.policy if pooled else None)
        if key not in self.tables:
            if first + frames > self.max_position:
                raise ValueError(
                    f"frame position {first + frames - 1} is past the rotary table of {self.max_position} positions "
                    f"(rope_max_seq_len): keep fewer frames in the cache (at most {self.max_position - frames})")
            positions = torch.arange(first, first + frames)
            if pooled:
                tables = rotary_tables_at(self.rope, positions, *self.policy.pooled_grid(height, width))
            else:
                tables = rotary_tables(self.rope, positions, height, width)
            self.tables[key] = tuple(t.to(device) for t in tables)
        return self.tables[key]

    def _tables_at(self, positions: list[int], height: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables, (1, 1, len(positions) * height * width, dim), of whole frames at ``positions``
        (any, not only a run); height = width = 1 turns in time only (the spatial parts at 0, no turn)."""
        key = ("at", tuple(positions), height, width, device)
        if key not in self.tables:
            tables = rotary_tables(self.rope, torch.tensor(positions, dtype=torch.long), height, width)
            self.tables[key] = tuple(t.to(device) for t in tables)
        return self.tables[key]

    def _check_batch(self, layer: int, batch: int) -> None:
        if self.keys[layer].data.shape[0] != batch:
            raise ValueError(f"the cache holds a batch of {self.keys[layer].data.shape[0]}, this call has {batch}: "
                             "a stream keeps one cache per batch (classifier-free guidance needs one per branch)")

    def _cached(self, layer: int, batch: int, heads: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys, rotated at their positions, and values of ``layer``, (B, H, cached tokens,
        dim), in generation order: the whole frames older than the pooled ones, the pooled frames,
        the whole frames after them."""
        whole, pooled = len(self.frames), len(self.pooled)
        self._check_batch(layer, batch)
        keys, values = load(self.keys[layer], dtype), load(self.values[layer], dtype)  # (B, H, frames, tokens, dim)
        older = sum(frame < self.pooled[0] for frame in self.frames) if pooled else whole
        parts = [(keys[:, :, :older], values[:, :, :older], 0, False)]
        if pooled:
            parts.append((load(self.pooled_keys[layer], dtype), load(self.pooled_values[layer], dtype), older, True))
            parts.append((keys[:, :, older:], values[:, :, older:], older + pooled, False))
        rotated, kept_values = [], []
        for part_keys, part_values, first, is_pooled in parts:
            frames = part_keys.shape[2]
            if frames:
                cos, sin = self._tables(first, frames, device, is_pooled)
                rotated.append(rotate(part_keys.reshape(batch, heads, -1, part_keys.shape[-1]), cos, sin))
                kept_values.append(part_values.reshape(batch, heads, -1, part_values.shape[-1]))
        return torch.cat(rotated, dim=2), torch.cat(kept_values, dim=2)

    def _sparse_cached(self, layer: int, query: torch.Tensor, batch: int, heads: int,
                       dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """What ``_cached`` gives, but of the whole frames kv-sparse chooses for each (B, H) from the
        chunk's rotated ``query``: [chosen whole frames, pooled frames], (B, H, read tokens, dim). A
        frame not chosen is not read: only the chosen ones are gathered from the store."""
        if self.policy is None:
            raise ValueError(f"{self.sparse_term} chooses among the frames a KV cache policy keeps, and the cache has "
                             "none; valid: a recipe with kv-full, kv-window, kv-sink-window or kv-pack beside it")
        whole, pooled = len(self.frames), len(self.pooled)
        self._check_batch(layer, batch)
        older = sum(frame < self.pooled[0] for frame in self.frames) if pooled else whole
        positions = [i if i < older else i + pooled for i in range(whole)]  # as _cached reads them
        cos, sin = self._tables_at(positions, 1, 1, query.device)  # (1, 1, whole, dim): the turn in time
        chosen = self.sparse_term.choose(self.sparse_term.score(query, self.summaries[layer], cos, sin))
        if chosen is None:  # every frame: the dense cache itself
            self.sparse_reads = [self.sparse_reads[0] + whole + pooled, self.sparse_reads[1] + whole + pooled]
            return self._cached(layer, batch, heads, dtype, query.device)
        reads = chosen.shape[-1]
        self.sparse_reads = [self.sparse_reads[0] + reads + pooled, self.sparse_reads[1] + whole + pooled]
        height, width = self.patches
        tokens = height * width
        keys = load(self.keys[layer].gather_frames(chosen), dtype)  # (B, H, reads, tokens, dim)
        values = load(self.values[layer].gather_frames(chosen), dtype)
        dim = keys.shape[-1]
        pick = chosen.view(batch, heads, reads, 1, 1).expand(-1, -1, -1, tokens, dim)
        cos, sin = (table.view(1, 1, whole, tokens, dim).expand(batch, heads, -1, -1, -1).gather(2, pick)
                    for table in self._tables_at(positions, height, width, query.device))
        rotated = [rotate(keys.reshape(batch, heads, -1, dim), cos.reshape(batch, heads, -1, dim),
                          sin.reshape(batch, heads, -1, dim))]
        kept_values = [values.reshape(batch, heads, -1, values.shape[-1])]
        if pooled:
            cos, sin = self._tables(older, pooled, query.device, True)
            rotated.append(rotate(load(self.pooled_keys[layer], dtype).reshape(batch, heads, -1, dim), cos, sin))
            kept_values.append(load(self.pooled_values[layer], dtype).reshape(batch, heads, -1, values.shape[-1]))
        return torch.cat(rotated, dim=2), torch.cat(kept_values, dim=2)

    # -- one attention call ----------------------------------------------------------------
    def attend(self, layer: int, query, key, value, scale) -> torch.Tensor:
        """query, key, value: (B, H, tokens, dim) of the current chunk, before RoPE. The cached
        keys are dequantized and rotated again on every call (each denoising step of a chunk, and
        its write pass), so the cache stays at its stored format's size; what that work costs at
        the real size is not measured yet (benchmarks/stream_realsize.py)."""
        batch, heads, tokens, _ = key.shape
        height, width = self.patches
        per_frame = height * width
        frames = tokens // per_frame
        kept = len(self.frames) + len(self.pooled)
        cos, sin = self._tables(kept, frames, query.device)
        query, rotated = rotate(query, cos, sin), rotate(key, cos, sin)
        if self.mode == "write":
            self.staged[layer] = (key, value)
        if kept:
            if self.sparse_term is not None:
                cached_key, cached_value = self._sparse_cached(layer, query, batch, heads, key.dtype)
            else:
                cached_key, cached_value = self._cached(layer, batch, heads, key.dtype, query.device)
            rotated = torch.cat([cached_key, rotated], dim=2)
            value = torch.cat([cached_value, value], dim=2)
        return dense_backend.attend(query, rotated, value, scale, self.stand_ins[layer].backend)

    def commit(self) -> list[int]:
        """Append the chunk the last ``write`` forward saw to the cache, evict what the policy
        drops; return the absolute indices of the frames now kept."""
        if len(self.staged) != len(self.modules):
            raise RuntimeError(f"commit() after a write forward that reached {len(self.staged)} of "
                               f"{len(self.modules)} attention layers; run the model in write mode first")
        height, width = self.patches
        frames = self.staged[0][0].shape[2] // (height * width)
        new = list(range(self.written, self.written + frames))
        every = self.frames + new
        keep = self.policy.keep(every) if self.policy is not None else every
        kept = set(keep)
        index = _index([i for i, frame in enumerate(every) if frame in kept])
        evicted = [frame for frame in every if frame not in kept]
        pooled = self.policy.keep_pooled(self.pooled + evicted) if self.policy is not None else []
        to_pool = [frame for frame in evicted if frame in pooled]  # newer than every frame pooled already
        stay = _index([i for i, frame in enumerate(self.pooled) if frame in pooled])
        # The cache reads [whole frames older than the pooled, pooled, whole frames newer] (_cached).
        inside = bool(pooled) and any(pooled[0] < frame < pooled[-1] for frame in keep)
        if [frame for frame in self.pooled if frame in pooled] + to_pool != pooled or inside:
            raise RuntimeError(f"{self.policy} pooled frames {pooled} out of the pooled {self.pooled} and evicted "
                               f"{evicted}, around the whole frames {keep}: the pooled frames must be a run of "
                               "consecutive kept frames, oldest first")
        to_pool_index = _index([i for i, frame in enumerate(every) if frame in to_pool])
        for layer, (key, value) in self.staged.items():
            key_frames = self.format.store(key.unflatten(2, (frames, height * width)))  # (B, H, frames, tokens, dim)
            value_frames = self.format.store(value.unflatten(2, (frames, height * width)))
            key_all = key_frames if self.keys[layer] is None else self.keys[layer].append(key_frames)
            value_all = value_frames if self.values[layer] is None else self.values[layer].append(value_frames)
            if pooled or self.pooled:
                self.pooled_keys[layer] = self._pool(self.pooled_keys[layer], stay, key_all, to_pool_index, key.dtype)
                self.pooled_values[layer] = self._pool(self.pooled_values[layer], stay, value_all, to_pool_index,
                                                       value.dtype)
            self.keys[layer], self.values[layer] = key_all.select_frames(index), value_all.select_frames(index)
            if self.sparse_term is not None:
                self.summaries[layer] = self._summarize(layer, key.unflatten(2, (frames, height * width)), index)
        self.frames, self.pooled, self.written = keep, pooled, self.written + frames
        self.set_mode("read")
        return list(keep)

    def _summarize(self, layer: int, key: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """kv-sparse's mean keys after a commit: those held and the new frames' (key: (B, H, frames,
        tokens, dim), unrotated), of the whole frames at ``index``."""
        height, width = self.patches
        cos, sin = self._tables_at([0], height, width, key.device)  # a frame at time 0: spatial turns only
        fresh = self.sparse_term.summarize(key, cos, sin)  # (B, H, frames, dim)
        every = fresh if self.summaries[layer] is None else torch.cat([self.summaries[layer], fresh], dim=2)
        return every.index_select(2, index.to(every.device))

    def _pool(self, held: Stored | None, stay: torch.Tensor, every: Stored, to_pool: torch.Tensor,
              dtype) -> Stored | None:
        """The pooled store after a commit: the pooled frames at ``stay``, then the frames of ``every``
        at ``to_pool`` read back, pooled and stored again in the cache's format."""
        held = held.select_frames(stay) if held is not None and len(stay) else None
        if not len(to_pool):
            return held
        height, width = self.patches
        fresh = self.format.store(self.policy.pool(load(every.select_frames(to_pool), dtype), height, width))
        return fresh if held is None else held.append(fresh)

    # -- terms -------------------------------------------------------------------------------
    @contextmanager
    def lifted(self):
        """The cache's stand-ins taken off while the processors beneath them change (a dense
        ``attention-backend`` term applied or removed), then put back over whatever is there."""
        for module, stand_in in zip(self.modules, self.stand_ins):
            module.processor = stand_in.below
        try:
            yield
        finally:
            for module, stand_in in zip(self.modules, self.stand_ins):
                stand_in.place(module.processor)
                module.processor = stand_in

    def remove(self) -> None:
        for module, stand_in in zip(self.modules, self.stand_ins):
            module.processor = stand_in.below
        self.layout_hook.remove()
        delattr(self.model, KV_CACHE)
        _CACHES.pop(self.handle, None)

    def stats(self) -> dict:
        stats = {"kv_bytes": self.bytes(), "kept_frames": list(self.frames), "pooled_frames": list(self.pooled),
                 "written_frames": self.written}
        if self.sparse_term is not None:
            read, held = self.sparse_reads
            stats.update(kv_sparse_frames_read=read, kv_sparse_frames_cached=held,
                         kv_sparse_read_share=read / held if held else 1.0)
        return stats


def attach(model: torch.nn.Module) -> KVCache:
    """The model's KV cache, installed if it has none; one more term uses it."""
    cache = getattr(model, KV_CACHE, None) or KVCache(model)
    cache.users += 1
    return cache


def beneath_cache(model: torch.nn.Module, change):
    """``change()`` (a token-level term's apply or remove), beneath the model's KV cache if it has one."""
    cache = getattr(model, KV_CACHE, None)
    if cache is None:
        return change()
    with cache.lifted():
        return change()


def detach(cache: KVCache) -> None:
    cache.users -= 1
    if cache.users <= 0:
        cache.remove()


def apply_policy(model: torch.nn.Module, config: KVPolicyConfig) -> Handle:
    """Put ``config`` on the model's KV cache; the handle's ``remove()`` takes it off (and the
    stand-ins, with the last sequence term), restoring the model exactly."""
    return _hold(model, config, "policy", "already has the policy")


def apply_format(model: torch.nn.Module, config: KVFormatConfig) -> Handle:
    rope = getattr(model, "rope", None)
    if rope is not None and hasattr(rope, "attention_head_dim"):  # a model the cache refuses says so in attach()
        config.check_model(rope.attention_head_dim)
    return _hold(model, config, "format_term", "is already stored as")


def apply_sparse(model: torch.nn.Module, config) -> Handle:
    """Put kv-sparse (``config``) on the model's KV cache, before a stream starts: it scores the frames
    by means kept from their write, which frames cached without it lack."""
    cache = getattr(model, KV_CACHE, None)
    if cache is not None and cache.frames:
        raise ValueError(f"cannot apply {config}: the model's KV cache already holds frames {cache.frames}, cached "
                         "without the key means it scores frames by; valid: apply it before the stream starts")
    return _hold(model, config, "sparse_term", "already chooses the frames it reads by")


def _index(positions: list[int]) -> torch.Tensor:
    return torch.tensor(positions, dtype=torch.long)


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
