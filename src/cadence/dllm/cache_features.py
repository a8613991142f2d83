"""Feature caches for masked-diffusion decoding: dLLM-Cache and SPA-Cache.

Where the KV caches of :mod:`cadence.dllm.cache` skip whole spans of tokens (everything
outside the block), these caches skip token-layer work anywhere in the response: every
decoder layer keeps, for every token, its attention output and its FFN output (the two
residual updates of the layer) with its keys and values, and a step recomputes them only
for the tokens that moved. A skipped token still carries its fresh residual stream: its
layer output is ``input + cached attention + cached FFN``.

- ``dllm-cache(prompt_every, response_every, ratio)``: dLLM-Cache (Liu et al. 2025,
  arXiv:2506.06295). The prompt's features are recomputed every ``prompt_every``
  steps, the response's every ``response_every`` steps; at the other steps each layer
  computes the value vectors of every response token (cheap: one projection), compares them
  with the values it holds ("V-verify", cosine similarity) and recomputes the ``ratio`` of
  response tokens whose values changed most: their query attends to every key (fresh keys
  for the recomputed tokens, cached keys for the others, this step's values for the whole
  response), then their FFN.
- ``spa-cache(rank, ratio, refresh_every)``: SPA-Cache (Sun et al. 2026, "Singular Proxies
  for Adaptive Caching in Diffusion Language Models", arXiv:2602.02544). The same update,
  with the tokens chosen by a rank-``rank`` *singular proxy* of the values: each layer
  projects its normalised input onto the top ``rank`` right singular vectors of its value
  projection ``W_v``, scaled by their singular values (``S_r Vh_r x = U_r^T W_v x``: the
  value's first ``rank`` coordinates in its own singular basis, the best rank-``rank``
  view of it), so the drift test costs ``rank`` numbers a token instead of a full value
  vector. Everything is recomputed every ``refresh_every`` steps.

Both compare a token's indicator with the one seen at the previous step (the papers' code
overwrites the stored values, or proxies, of every response token at every step), and pick
``ceil(ratio * response tokens)`` per row and per layer. A step on which every token is
recomputed is the uncached layer, call for call: ``ratio=1`` with the prompt refreshed each
step, or a refresh every step, is the uncached model bit for bit. Otherwise it is
approximate: a token kept from the cache carries attention and FFN outputs computed before
its neighbours (or its own deeper inputs) changed, and its cached keys are as old.

Where these differ from the papers, and why:

- dLLM-Cache counts its steps over the whole generation; so does this one (a cadence engine
  generation, or for a pipeline each input shape: ``LLaDA2Pipeline`` grows its input a block
  at a time). The prompt is what precedes the first masked position at the generation's
  first step; for a pipeline that includes the blocks it already decoded.
- SPA-Cache recomputes the keys and values of every response token at every step and
  spreads the budget over depth with a Gaussian fitted per checkpoint (a peak at 3/4 of the
  depth, first layer always recomputed). Here a skipped token keeps its cached keys and
  values, so it costs only its ``rank``-number proxy (the point of a proxy), and the budget
  is the same ``ratio`` at every layer: cadence has no per-checkpoint fit for ref-dllm.

The caches are hooks (diffusers' ``ModelHook``): one on the model's forward sets the step's
schedule, one on every decoder layer answers it, so they work under cadence's engine and
under a pipeline that calls the model itself (``LLaDA2Pipeline``). ``remove()`` takes both off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry, ModelHook

from cadence.accel.registry import param, register
from cadence.dllm.cache import cache_keyword, has_no_cache, same_padding, split_call
from cadence.dllm.plan import install_term, plan_of
from cadence.dllm.policies import DllmTerm
from cadence.models.llada import dllm_family_of

HOOK = "cadence.dllm.feature-cache"
LAYER_HOOK = "cadence.dllm.feature-cache.layer"
# what a decoder layer must hold for the cache to run its halves apart (Llama naming)
LAYER_PARTS = ("input_layernorm", "post_attention_layernorm", "mlp")

_RATIO = {"low": 0.0, "high": 1.0, "low_open": True, "why": "a share of the response tokens; 1 recomputes all of them"}


@dataclass(frozen=True)
class DllmCacheConfig(DllmTerm):
    name = "dllm-cache"
    summary = "per-layer feature cache; recompute the response tokens whose values moved most (dLLM-Cache)"
    role = "cache"
    compile_safe = False  # hooks every decoder layer, with Python state per call

    prompt_every: int = param(50, "recompute the prompt's features every N steps (dLLM-Cache's K_p)", low=1)
    response_every: int = param(7, "recompute every response token's features every N steps (K_r)", low=1)
    ratio: float = param(0.25, "share of response tokens recomputed at the other steps (V-verify)", **_RATIO)

    def schedule(self, step: int) -> tuple[bool, bool]:
        """(recompute the prompt, recompute the whole response) at ``step`` of a generation."""
        return step % self.prompt_every == 0, step % self.response_every == 0


@dataclass(frozen=True)
class SpaCacheConfig(DllmTerm):
    name = "spa-cache"
    summary = "per-layer feature cache; recompute the tokens whose low-rank value proxy moved most (SPA-Cache)"
    role = "cache"
    compile_safe = False

    rank: int = param(
        8,
        "dimensions of the singular proxy (top singular directions of W_v); at most the value projection's rank",
        low=1,
    )
    ratio: float = param(0.25, "share of response tokens recomputed between refreshes", **_RATIO)
    refresh_every: int = param(8, "recompute every token every N steps", low=1)

    def schedule(self, step: int) -> tuple[bool, bool]:
        refresh = step % self.refresh_every == 0
        return refresh, refresh


@dataclass
class _Step:
    """What the model hook tells the layer hooks about the forward in progress."""

    active: bool = False
    prompt_length: int = 0
    refresh_prompt: bool = True
    refresh_response: bool = True


class _LayerCache:
    """One layer's features of every token: (B, kv heads, N, head dim) keys and values,
    (B, N, hidden) attention and FFN outputs, (B, response, F) indicators of the last step."""

    keys = values = attention = ffn = indicator = None


class _LayerRecord:
    """transformers' ``cache.update`` contract: at a full step keep the keys and values."""

    def __init__(self, cache: _LayerCache):
        self.cache = cache

    def update(self, key, value, layer_idx, *args, **kwargs):
        self.cache.keys, self.cache.values = key, value
        return key, value


class _Splice:
    """At a partial step: the recomputed rows' fresh keys and values written into the held ones."""

    def __init__(self, cache: _LayerCache, rows: torch.Tensor):
        self.cache, self.rows = cache, rows  # rows: (B, k) canvas positions

    def update(self, key, value, layer_idx, *args, **kwargs):  # (B, kv heads, k, head dim)
        index = self.rows[:, None, :, None].expand_as(key)
        self.cache.keys.scatter_(2, index, key)
        self.cache.values.scatter_(2, index, value)
        return self.cache.keys, self.cache.values


def _rows_of(tensor: torch.Tensor | None, rows: torch.Tensor, dim: int) -> torch.Tensor | None:
    """``tensor`` at positions ``rows`` (B, k) along ``dim``, batch broadcast as needed."""
    if tensor is None or tensor.shape[dim] == 1:  # absent, or broadcast along the token axis
        return tensor
    tensor = tensor.expand(len(rows), *tensor.shape[1:])
    shape, size = [1] * tensor.dim(), list(tensor.shape)
    shape[0], shape[dim] = rows.shape
    size[dim] = rows.shape[1]
    index = rows.view(shape).expand(size)
    return tensor.gather(dim, index)


def _scatter_rows(held: torch.Tensor, rows: torch.Tensor, fresh: torch.Tensor) -> None:
    held.scatter_(1, rows[:, :, None].expand_as(fresh), fresh)  # (B, N, hidden) <- (B, k, hidden)


class _FeatureLayerHook(ModelHook):
    """Runs one decoder layer on the rows the step recomputes; the others keep their features."""

    def __init__(self, owner: FeatureCacheHook, index: int):
        super().__init__()
        self.owner, self.index = owner, index

    def new_forward(self, layer, hidden_states, *args, **kwargs):
        step = self.owner.step
        if not step.active or args or not has_no_cache(kwargs):
            return self.fn_ref.original_forward(hidden_states, *args, **kwargs)
        return self.owner.layer_forward(self.index, layer, hidden_states, kwargs)


class FeatureCacheHook(ModelHook):
    """On the model: decides each forward's schedule and holds every layer's features."""

    _is_stateful = True  # diffusers resets it at the end of a pipeline call

    def __init__(self, config, model, layers):
        super().__init__()
        self.config, self.model, self.layers = config, model, layers
        self.cache_keyword = cache_keyword(layers[0].self_attn)
        self.mask_token_id = model.config.mask_token_id
        self.step = _Step()
        self.proxies = _singular_proxies(layers, config.rank) if isinstance(config, SpaCacheConfig) else None
        self.full_forwards = self.partial_forwards = self.computed_rows = self.total_rows = 0
        self.reset_state(model)

    def reset_state(self, module):
        self.caches = [_LayerCache() for _ in self.layers]
        self.key = None  # what the held features were computed for
        self.steps = 0  # forwards since the first step of the generation
        return module

    # --- the model's forward: which rows this step recomputes

    def new_forward(self, module, *args, **kwargs):
        input_ids, args, cached = split_call(args, kwargs)
        if not cached:
            return self.fn_ref.original_forward(*args, input_ids=input_ids, **kwargs)
        attention_mask = kwargs.get("attention_mask")
        plan = plan_of(self.model)
        in_engine = plan is not None and plan.window is not None
        key = ("engine", plan.generation, tuple(input_ids.shape)) if in_engine else ("pipeline", tuple(input_ids.shape))
        if self._new_generation(input_ids, attention_mask, key):
            self.reset_state(module)
            masked = (input_ids == self.mask_token_id).any(0).nonzero()
            self.key, self.prompt_length = key, int(masked[0]) if len(masked) else input_ids.shape[1]
            self.prompt_ids = input_ids[:, : self.prompt_length].clone()
            self.attention_mask = attention_mask.clone() if attention_mask is not None else None
        refresh_prompt, refresh_response = self.config.schedule(self.steps)
        self.step = _Step(True, self.prompt_length, refresh_prompt, refresh_response)
        try:
            output = self.fn_ref.original_forward(input_ids=input_ids, **kwargs)
        finally:
            self.step = _Step()
        if refresh_prompt and refresh_response:
            self.full_forwards += 1
        else:
            self.partial_forwards += 1
        self.steps += 1
        return output

    def _new_generation(self, input_ids, attention_mask, key) -> bool:
        """Start afresh for a new generation, or when a pipeline changed what the prompt's features saw
        (the engine never writes before the generation: its key is enough, and spares a comparison a step)."""
        if self.key != key:
            return True
        if key[0] == "engine":
            return False
        return not (same_padding(attention_mask, self.attention_mask) and torch.equal(input_ids[:, : self.prompt_length], self.prompt_ids))

    # --- one decoder layer

    def layer_forward(self, index, layer, hidden_states, kwargs):
        cache, step = self.caches[index], self.step
        batch, tokens, _ = hidden_states.shape
        prompt = step.prompt_length
        normed = layer.input_layernorm(hidden_states)  # per token: the rows of it are the rows' own
        indicator = self._indicator(index, layer, normed[:, prompt:])  # (B, response, F)
        rows = self._rows(cache, indicator, batch, tokens, prompt)
        cache.indicator = indicator
        self.total_rows += batch * tokens
        if rows is None:
            self.computed_rows += batch * tokens
            return self._full(cache, layer, hidden_states, normed, kwargs)
        self.computed_rows += rows.numel()
        if self.proxies is None:  # dLLM-Cache attends to this step's values of the whole response
            heads = cache.values.shape[1]
            cache.values[:, :, prompt:] = indicator.unflatten(-1, (heads, -1)).transpose(1, 2)
        if rows.shape[1]:
            attention, _ = layer.self_attn(
                hidden_states=_rows_of(normed, rows, 1),
                **{self.cache_keyword: _Splice(cache, rows)},
                attention_mask=_rows_of(kwargs.get("attention_mask"), rows, 2),
                position_embeddings=tuple(_rows_of(part, rows, 1) for part in kwargs["position_embeddings"]),
                **{
                    name: (_rows_of(value, rows, 1) if name == "position_ids" else value)
                    for name, value in kwargs.items()
                    if name not in ("attention_mask", "position_embeddings")
                },
            )
            _scatter_rows(cache.attention, rows, attention)
        hidden_states = hidden_states + cache.attention
        if rows.shape[1]:
            ffn = layer.mlp(layer.post_attention_layernorm(_rows_of(hidden_states, rows, 1)))
            _scatter_rows(cache.ffn, rows, ffn)
        return hidden_states + cache.ffn

    def _indicator(self, index, layer, normed_response):
        """What the drift test compares: the values (dLLM-Cache) or their singular proxy (SPA-Cache)."""
        if self.proxies is None:
            return layer.self_attn.v_proj(normed_response)  # (B, response, kv heads * head dim)
        proxy = self.proxies[index]
        if proxy.dtype != normed_response.dtype or proxy.device != normed_response.device:
            proxy = self.proxies[index] = proxy.to(normed_response)  # once: the model's device and precision
        return normed_response @ proxy.T  # (B, response, rank)

    def _rows(self, cache, indicator, batch, tokens, prompt):
        """(B, k) positions this layer recomputes, ascending; None for all of them."""
        step, response = self.step, tokens - prompt
        device = indicator.device
        if cache.keys is None or (step.refresh_prompt and step.refresh_response):
            return None
        if step.refresh_response or self.config.ratio == 1.0:
            chosen = torch.arange(response, device=device).expand(batch, -1)
        else:
            similarity = torch.nn.functional.cosine_similarity(indicator, cache.indicator, dim=-1)  # (B, response)
            count = min(response, math.ceil(self.config.ratio * response))
            chosen = similarity.topk(count, dim=-1, largest=False).indices.sort(dim=-1).values
        if step.refresh_prompt:
            if chosen.shape[1] == response:
                return None
            chosen = torch.cat((torch.arange(-prompt, 0, device=device).expand(batch, -1), chosen), dim=1)
        return chosen + prompt

    def _full(self, cache, layer, hidden_states, normed, kwargs):
        """The layer's own computation, in its own order, keeping what it computed."""
        attention, _ = layer.self_attn(hidden_states=normed, **{self.cache_keyword: _LayerRecord(cache)}, **kwargs)
        hidden_states = hidden_states + attention
        ffn = layer.mlp(layer.post_attention_layernorm(hidden_states))
        cache.attention, cache.ffn = attention, ffn
        return hidden_states + ffn

    def stats(self) -> dict:
        return {
            "full_forwards": self.full_forwards,
            "cached_forwards": self.partial_forwards,
            "forwards": self.full_forwards + self.partial_forwards,
            "compute_fraction": self.computed_rows / self.total_rows if self.total_rows else None,
        }


def _singular_proxies(layers, rank: int) -> list[torch.Tensor]:
    """Per layer, (rank, hidden): the top right singular vectors of W_v scaled by their singular
    values (SPA-Cache's proxy), so ``proxy @ x`` are the value's leading singular coordinates."""
    proxies = []
    for layer in layers:
        weight = layer.self_attn.v_proj.weight.detach().float()  # (kv heads * head dim, hidden)
        _, singular, right = torch.linalg.svd(weight, full_matrices=False)
        proxies.append(singular[:rank, None] * right[:rank])
    return proxies


def apply(model, config: DllmCacheConfig | SpaCacheConfig):
    from cadence.dllm import gemma

    family = dllm_family_of(model)  # refuses a model of no known family
    if family is gemma.GEMMA:
        return gemma.apply_cache(model, config)  # refuses it, saying why
    layers = list(family.layer_list(model))
    missing = sorted({part for layer in layers for part in (*LAYER_PARTS, "self_attn") if not hasattr(layer, part)})
    if missing:
        raise ValueError(
            f"{config}: the decoder layers of {type(model).__name__} have no {', '.join(missing)}; a "
            f"feature cache runs a layer's halves apart and needs {', '.join((*LAYER_PARTS, 'self_attn'))}"
        )
    if isinstance(config, SpaCacheConfig):
        most = min(layers[0].self_attn.v_proj.weight.shape)
        config.require(
            config.rank <= most,
            f"rank={config.rank} exceeds what the value projection of {type(model).__name__} holds; valid: 1 to {most}",
        )
    hook = FeatureCacheHook(config, model, layers)

    def remove():
        for layer in layers:
            HookRegistry.check_if_exists_or_initialize(layer).remove_hook(LAYER_HOOK, recurse=False)
        HookRegistry.check_if_exists_or_initialize(model).remove_hook(HOOK, recurse=False)

    handle = install_term(model, "cache", config, on_remove=remove, stats=hook.stats)  # refuses a second cache
    HookRegistry.check_if_exists_or_initialize(model).register_hook(hook, HOOK)
    for index, layer in enumerate(layers):
        HookRegistry.check_if_exists_or_initialize(layer).register_hook(_FeatureLayerHook(hook, index), LAYER_HOOK)
    return handle


register(DllmCacheConfig, apply)
register(SpaCacheConfig, apply)
