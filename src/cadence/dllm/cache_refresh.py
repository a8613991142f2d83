"""KV caches that decide per token or per step what to recompute: dKV-Cache and Elastic-Cache.

Fast-dLLM's caches (:mod:`cadence.dllm.cache`) recompute a fixed span (the current block, or
the block and the masked suffix) and refresh everything when a block starts. The two terms
here reuse its hook (the model's forward answered from recorded keys and values, through the
``cache`` object transformers' attention calls) and choose differently:

- ``dkv-cache(delay=1)`` (dKV-Cache): a token is recomputed while it is masked and for
  ``delay`` steps after it is committed (or edited), then its keys and values are frozen in
  the cache, which every step updates with the tokens it recomputed. The active set need not
  be contiguous; it is the union over the batch rows, so one slice serves the batch.
- ``elastic-cache(threshold=0.9)`` (Elastic-Cache): the dual cache, refreshed when the
  attention the current block pays to its most-attended cached token drifts from what it was
  at the last refresh (cosine similarity below ``threshold``); with ``depth_aware=true`` the
  refresh recomputes only the watched layer and those above it.

Both take ``refresh_every`` as cache.py does; ``refresh_every=1`` (and, for elastic-cache,
``threshold=1.0``) refreshes on every step, which is the uncached model bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cadence.accel.registry import param, register
from cadence.dllm.cache import (
    KVCacheConfig,
    KVCacheHook,
    Record,
    Splice,
    apply_hook,
    same_padding,
)
from cadence.dllm.plan import plan_of
from cadence.models.llada import dllm_family_of

# ----------------------------------------------------------------------------- dKV-Cache


@dataclass(frozen=True)
class DkvCacheConfig(KVCacheConfig):
    """dKV-Cache (Ma et al. 2025, "dKV-Cache: The Cache for Diffusion Language Models",
    dKV-Cache-Decode): decoded tokens' keys and values are cached with a one-step delay (the
    step after a token is committed it is recomputed once as a real token, since its
    representation at the commit step was still that of a mask), masked tokens are always
    recomputed, and the whole cache is refreshed every ``refresh_every`` steps.

    Where this differs: ``delay`` generalises the paper's one step; a token whose id changes
    for any reason (token editing, a pipeline's own remasking) counts as newly committed, so
    an edited token is never served stale keys; the active set is the union over the batch
    rows (one slice for the batch); the cache also refreshes when a new generation (the
    engine) or a new input shape (a pipeline's next block) begins, not at every block. The
    logits of a position not recomputed are those of the step that last computed it: the
    engine reads only the masked ones, which are always recomputed.
    """

    name = "dkv-cache"
    summary = "recompute masked tokens and those committed in the last few steps, cache the rest (dKV-Cache)"

    refresh_every: int = param(0, "also refresh the whole cache every N steps; 0: only when a generation (or a "
                                  "pipeline's next block) starts; 1: every step, which is the uncached model", low=0)
    delay: int = param(1, "steps a committed token is still recomputed before its keys are frozen; the paper's 1",
                       low=1)

    def validate(self):
        self.require(isinstance(self.delay, int) and not isinstance(self.delay, bool),
                     f"delay={self.delay!r} must be an integer >= 1 (steps a committed token is still recomputed)")


class _Scatter:
    """A cached step's cache: the recomputed tokens' fresh keys written into the recorded
    ones at their canvas positions (the record keeps them: the cache is updated every step)."""

    def __init__(self, record, index: torch.Tensor):
        self.record, self.index = record, index

    def update(self, key, value, layer_idx, *args, **kwargs):  # (B, kv heads, active tokens, head dim)
        record = self.record
        record.keys[layer_idx] = record.keys[layer_idx].index_copy(2, self.index, key)  # out of place: autograd-safe
        record.values[layer_idx] = record.values[layer_idx].index_copy(2, self.index, value)
        return record.keys[layer_idx], record.values[layer_idx]


class DkvCacheHook(KVCacheHook):
    def reset_state(self, module):
        super().reset_state(module)
        self.previous_ids = None  # (B, tokens): the last call's input, to see what was committed since
        self.fresh_until = None  # (tokens,): a position is recomputed while steps_since_refresh < this
        return module

    def _window_and_key(self, input_ids, attention_mask):
        _, key = super()._window_and_key(input_ids, attention_mask)
        if key[0] == "engine":  # a new block is no reason to refresh: its masks are recomputed anyway
            key = key[:2] + key[3:]
        return None, key

    def _must_refresh(self, input_ids, attention_mask, window, key) -> bool:
        return self._expired(key) or not same_padding(attention_mask, self.padding)

    def _refresh(self, input_ids, kwargs, key):
        output = super()._refresh(input_ids, kwargs, key)
        self.previous_ids = input_ids.clone()
        self.fresh_until = torch.zeros(input_ids.shape[1], dtype=torch.long, device=input_ids.device)
        padding = kwargs.get("attention_mask")
        self.padding = None if padding is None else padding.clone()
        self.output_type = type(output)
        return output

    def _cached_forward(self, input_ids, kwargs, window):
        step = self.steps_since_refresh + 1
        touched = ((input_ids == self.mask_token_id) | (input_ids != self.previous_ids)).any(0)  # (tokens,)
        self.fresh_until[touched] = step + self.config.delay
        self.previous_ids = input_ids.clone()
        index = (self.fresh_until > step).nonzero().squeeze(1)  # the active positions, in canvas order
        logits = self.logits.clone()  # (B, tokens, vocab): each position as last computed
        if len(index):
            position_ids = kwargs.get("position_ids")
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
            sliced = {**kwargs, "position_ids": position_ids[:, index]}
            output = self.fn_ref.original_forward(input_ids=input_ids[:, index],
                                                  **{self.cache_keyword: _Scatter(self.record, index)}, **sliced)
            logits[:, index] = output.logits
        else:  # nothing changed since the last step: the cache answers alone
            output = self.output_type()
        # shared with the caller, who only reads them (the engine and diffusers' scheduler work out of place)
        self.logits = output.logits = logits
        self.steps_since_refresh += 1
        self.partial_forwards += 1
        self.computed_tokens += input_ids.shape[0] * len(index)
        return output


# ------------------------------------------------------------------------- Elastic-Cache


@dataclass(frozen=True)
class ElasticCacheConfig(KVCacheConfig):
    """Elastic-Cache (Nguyen-Tri, Ranjan and Shen 2025, "Attention Is All You Need for KV Cache
    in Diffusion LLMs"): between refreshes the dual cache (only the current block computed);
    at every cached step, the cached token that the block's queries attended most at the last
    refresh is watched, and when the block's attention to it drifts (cosine similarity of the
    attention weights, over heads and the block's queries, below ``threshold``) the cache is
    refreshed. The paper's reading: the most-attended token drifts least, so its drift is a
    conservative signal for every cached token.

    Where this differs: the drift is measured against the attention at the last refresh (what
    the cache holds, so drift that accumulates slowly over many steps still triggers), where
    the paper, as we read it, tests the change between consecutive steps; it is the
    attention weights, not the key, that are compared, because the watched token is cached
    (its key is not recomputed) while the block's queries are computed anyway, so the
    attention to it is the one signal available without extra tokens; one layer is watched
    (``layer``, the deepest by default, where the paper finds drift largest), not every layer.
    The cached step is abandoned at the watched layer when it drifts, and its work up to there
    is counted in the compute fraction. The sliding window and the block-wise caching of far
    MASK tokens are the engine's blocks here.

    Depth-aware refresh (``depth_aware=true``; the paper's "where to refresh"): a drift at the
    watched layer recomputes that layer and every deeper one for all tokens, and keeps the
    shallower layers' cached keys and values. The deep layers need every token's input at the
    watched layer, and a cached token's is not computed in a cached step. So each full refresh
    keeps that input, the residual stream entering the watched layer, and a depth-aware refresh
    feeds the layers the kept input of the cached tokens with the active tokens' fresh one in
    their place. The paper, as we read it, recomputes from the drifting layer with what its
    forward has at hand. Here the cached tokens' inputs are the last full refresh's: by the
    paper's premise (shallow layers drift least) a small error, not measured here (the
    test bounds it on a random tiny model only). At ``layer=0`` that input is
    the token embeddings, which never go stale, so the refresh equals a full one bit for bit.
    """

    name = "elastic-cache"
    summary = "the dual cache, refreshed when the block's attention to its most-attended cached token drifts"
    reuse_suffix = True

    threshold: float = param(0.9, "refresh when the cosine similarity of the watched attention falls below this; "
                                  "1.0 refreshes every step (the uncached model)", low=0.0, high=1.0, low_open=True,
                             why="a cosine similarity of non-negative weights lies in (0, 1]; 0 would never refresh")
    layer: int = param(-1, "the layer whose attention is watched; -1: the deepest (where the paper finds drift "
                           "largest)", low=-1)
    depth_aware: bool = param(False, "on a drift, recompute only the watched layer and the deeper ones, keeping the "
                                     "shallower layers' cache; false: refresh every layer")

    def validate(self):
        self.require(isinstance(self.layer, int) and not isinstance(self.layer, bool),
                     f"layer={self.layer!r} must be an integer >= -1 (a layer index; -1: the deepest)")
        self.require(isinstance(self.depth_aware, bool), f"depth_aware={self.depth_aware!r} must be true or false")


class _Drifted(Exception):
    """Raised inside a cached step's attention when the watched attention drifted: the step
    stops there and the hook refreshes instead."""


def _rotate(x, cos, sin):
    """Rotary positions (Llama's ``rotate_half`` form) on (B, heads, tokens, head dim)."""
    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin[:, None]


class _Watch:
    """The watched layer's attention: a forward pre-hook catches its input (hidden states and
    rotary tables) so the queries can be rebuilt where the cache sees only keys; another
    catches the layer's own input (the residual stream), which a depth-aware refresh starts from."""

    def __init__(self, model, config: ElasticCacheConfig):
        family = dllm_family_of(model)
        layers = family.layer_list(model)
        depth = len(layers)
        if not -1 <= config.layer < depth:
            raise ValueError(f"{config}: layer={config.layer} is not a layer of this {depth}-layer model; valid: -1 "
                             f"(the deepest) or 0..{depth - 1}")
        self.layer = depth - 1 if config.layer == -1 else config.layer
        self.depth = depth
        self.layers = layers
        self.attention = getattr(layers[self.layer], family.attention)
        self.hidden = self.rotary = self.padding = self.layer_input = None

    @contextmanager
    def catching(self, padding):
        """Catch the watched attention's input for the duration of one forward."""
        self.padding = padding if padding is not None and padding.ndim == 2 else None  # (B, tokens) or None

        def catch(module, args, kwargs):
            self.hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self.rotary = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1]

        def catch_layer_input(module, args, kwargs):
            self.layer_input = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        handles = (self.attention.register_forward_pre_hook(catch, with_kwargs=True),
                   self.layers[self.layer].register_forward_pre_hook(catch_layer_input, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.hidden = self.rotary = self.layer_input = None

    @contextmanager
    def from_watched_layer(self, hidden: torch.Tensor):
        """For one forward: the layers below the watched one pass their input through, and the
        watched one starts from ``hidden`` (B, tokens, width) instead of what reaches it."""
        below = self.layers[:self.layer]
        own = [vars(layer).get("forward") for layer in below]  # a hook's forward, where one wraps the layer
        for layer in below:
            layer.forward = lambda hidden_states, *args, **kwargs: hidden_states

        def start(module, args, kwargs):
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": hidden}
            return (hidden, *args[1:]), kwargs

        handle = self.layers[self.layer].register_forward_pre_hook(start, with_kwargs=True, prepend=True)
        try:
            yield
        finally:
            handle.remove()
            for layer, forward in zip(below, own):
                if forward is None:
                    del layer.forward
                else:
                    layer.forward = forward

    @torch.no_grad()  # a measurement: it takes no part in the output
    def weights(self, keys: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Attention weights of the queries at [start, end) of the caught input over ``keys``:
        (B, heads, end - start, tokens), float32."""
        attention = self.attention
        hidden = self.hidden[:, start:end]
        batch, queries = hidden.shape[:2]
        query = attention.q_proj(hidden).view(batch, queries, -1, attention.head_dim).transpose(1, 2)
        cos, sin = self.rotary
        query = _rotate(query, cos[:, start:end], sin[:, start:end])
        keys = keys.repeat_interleave(attention.num_key_value_groups, dim=1)  # grouped keys to one per head
        scores = (query @ keys.transpose(2, 3)).float() * attention.scaling
        if self.padding is not None:
            scores = scores.masked_fill(self.padding[:, None, None, :] == 0, float("-inf"))
        return scores.softmax(-1)


class _WatchedSplice(Splice):
    """The dual cache's splice; at the watched layer it compares the block's attention to the
    watched token with the refresh's and stops the step when it drifted."""

    def __init__(self, hook: ElasticCacheHook, start: int, end: int):
        super().__init__(hook.record, start, end)
        self.hook = hook

    def update(self, key, value, layer_idx, *args, **kwargs):
        keys, values = super().update(key, value, layer_idx, *args, **kwargs)
        hook = self.hook
        if layer_idx == hook.watch.layer and hook.watched is not None:
            # the active tokens are the cached step's whole input: its queries are rows 0..end-start
            now = hook.watch.weights(keys, 0, self.end - self.start)  # (B, heads, active, tokens)
            now = now.gather(3, hook.watched[:, None, None, None].expand(*now.shape[:3], 1))[..., 0]
            similarity = F.cosine_similarity(now.flatten(1), hook.reference.flatten(1), dim=1)  # (B,)
            hook.similarity = float(similarity.min())
            if hook.similarity < hook.config.threshold:
                raise _Drifted
        return keys, values


class ElasticCacheHook(KVCacheHook):
    def __init__(self, config: ElasticCacheConfig, model):
        self.watch = _Watch(model, config)
        super().__init__(config, model)
        self.drift_refreshes = self.depth_refreshes = 0

    def reset_state(self, module):
        super().reset_state(module)
        self.watched = None  # (B,) canvas position of each row's most-attended cached token at the refresh
        self.reference = None  # (B, heads, active): the block's attention to it then
        self.similarity = None
        self.layer_input = None  # (B, tokens, width): every token's input to the watched layer at the refresh
        return module

    def new_forward(self, module, *args, **kwargs):
        with self.watch.catching(kwargs.get("attention_mask")):
            return super().new_forward(module, *args, **kwargs)

    def _must_refresh(self, input_ids, attention_mask, window, key) -> bool:
        # 1.0 refreshes without measuring: a float cosine can round to 1.0 either side of drift
        return self.config.threshold >= 1.0 or super()._must_refresh(input_ids, attention_mask, window, key)

    def _splice(self, start, end):
        return _WatchedSplice(self, start, end)

    def _refresh(self, input_ids, kwargs, key):
        output = super()._refresh(input_ids, kwargs, key)
        if self.config.threshold >= 1.0:
            return output
        self.layer_input = self.watch.layer_input if self.config.depth_aware else None
        self._watch_most_attended(input_ids, key)
        return output

    def _watch_most_attended(self, input_ids, key):
        """After a refresh: each row's most-attended cached token, and the block's attention to it."""
        start, end = self._active(input_ids, None if key[0] == "pipeline" else plan_of(self.model).window)
        weights = self.watch.weights(self.record.keys[self.watch.layer], start, end)  # (B, heads, active, tokens)
        received = weights.sum((1, 2))  # (B, tokens): attention each token receives from the block
        received[:, start:end] = -1.0  # the block itself is recomputed, never cached
        if self.watch.padding is not None:
            received = received.masked_fill(self.watch.padding == 0, -1.0)
        if end - start in (0, input_ids.shape[1]):  # no block to watch from, or nothing cached to go stale
            self.watched = self.reference = None
        else:
            self.watched = received.argmax(-1)
            self.reference = weights.gather(3, self.watched[:, None, None, None].expand(*weights.shape[:3], 1))[..., 0]

    def _refresh_from_watched_layer(self, input_ids, kwargs, window):
        """A depth-aware refresh: the watched layer and the deeper ones over every token, from the
        kept inputs of the cached tokens and the fresh ones of the active tokens."""
        start, end = self._active(input_ids, window)
        hidden = self.layer_input.clone()
        hidden[:, start:end] = self.watch.layer_input  # the abandoned step caught the active tokens' input
        record = Record()
        with self.watch.from_watched_layer(hidden):
            output = self.fn_ref.original_forward(input_ids=input_ids, **{self.cache_keyword: record}, **kwargs)
        self.record.keys.update(record.keys)  # the watched layer and deeper; the shallower ones stay
        self.record.values.update(record.values)
        self.logits, self.layer_input = output.logits, hidden
        self.steps_since_refresh = 0
        self.partial_forwards += 1
        self.depth_refreshes += 1
        self.computed_tokens += input_ids.numel() * (self.watch.depth - self.watch.layer) / self.watch.depth
        self._watch_most_attended(input_ids, self.key)
        return output

    def _cached_forward(self, input_ids, kwargs, window):
        try:
            return super()._cached_forward(input_ids, kwargs, window)
        except _Drifted:
            start, end = self._active(input_ids, window)
            # the abandoned step's work up to and including the watched layer
            self.computed_tokens += input_ids.shape[0] * (end - start) * (self.watch.layer + 1) / self.watch.depth
            self.drift_refreshes += 1
            if self.config.depth_aware:
                return self._refresh_from_watched_layer(input_ids, kwargs, window)
            return self._refresh(input_ids, kwargs, self.key)

    def stats(self) -> dict:
        return {**super().stats(), "drift_refreshes": self.drift_refreshes, "depth_refreshes": self.depth_refreshes,
                "last_similarity": self.similarity}


def apply_dkv(model, config: DkvCacheConfig):
    return apply_hook(model, config, DkvCacheHook)


def apply_elastic(model, config: ElasticCacheConfig):
    return apply_hook(model, config, ElasticCacheHook)


register(DkvCacheConfig, apply_dkv)
register(ElasticCacheConfig, apply_elastic)
