"""Sparse attention over the prompt for long contexts: ``prompt-sparse``.

A long prompt (the ``retrieve`` task's key-value lists) makes attention to the prompt the bulk
of every step, while a block being decoded needs few of the prompt's tokens. ``prompt-sparse(
density, block, sink, window, queries)`` cuts the prompt into key blocks of ``block`` tokens
(from its first column; the last block, next to the canvas, may be short) and lets the canvas's
queries read, of the prompt, only

- the ``sink`` first blocks that hold a real token of the row (attention sinks, StreamingLLM),
- the ``window`` last blocks before the canvas (the local context; a short last block is always
  kept, so that every row and head reads the same number of keys),
- and the blocks of highest estimated attention mass, until ``density`` of the prompt's blocks
  are kept: ``kept = min(blocks, max(ceil(density * blocks), sink + window))``, the rounding of
  ``accel.attention.patterns.keep_count``; the sink and window are kept even where they exceed
  the density (a short prompt).

Every key of the canvas (the generation, decided or masked) is always read. ``queries="canvas"``
(the default) keeps the prompt's own queries dense (the prompt reads the whole prompt, as its
features are what the selected blocks carry); ``queries="all"`` makes them read the same
selection too (sparse prefill: on a forward without a cache the prompt's rows are most of the work).

The estimate is SpargeAttn's and XAttention's block top-k (Zhang et al. 2025; Xu et al. 2025,
as ``accel.attention.topk`` does for video): mean-pool the queries of the block being decoded
per ``block`` tokens (``patterns.pooled``) and the prompt's keys per block (padding left out),
softmax the pooled scores over the prompt's blocks per query block and head, and average them
over the query blocks and the query heads that share a key head: the mass each prompt block
is expected to draw. It is made **once per decoded block and layer**, at the block's first
forward, from that forward's own queries and keys, and reused for every step of the block
(the block's queries move little while it is decoded; the dLLM KV caches make the same bet).
Outside cadence's engine (a direct model call, a pipeline) the term leaves attention dense:
the prompt's extent is what the engine's plan says.

Where this differs from the papers, and why:

- SpargeAttn and XAttention choose per query block, and run a block-sparse kernel. Here one
  selection serves every canvas query of a row and key head, and attention runs on the kept
  keys gathered into a shorter sequence: transformers' attention call takes no block mask, and
  a gathered sequence saves the work on any backend (sdpa or eager, CPU or GPU) without a kernel.
- SparseD (Wang et al. 2025, "Sparse Attention for Diffusion Language Models") also computes a
  head-specific pattern once and reuses it over denoising steps, but once for the whole
  generation, after dense early steps; here it is made again for every decoded block (the unit
  cadence's caches refresh on), and the block's first step is already sparse.
- Focus-dLLM (Long et al. 2026, arXiv:2602.02159) predicts from the previous step's confidence
  which masked positions will be decoded next, computes only those queries, and finds the
  attention sinks from the scores (reusing them across layers). Here the sinks are positional
  (the first real blocks, as StreamingLLM keeps them) and which queries run is the KV cache's
  business (``dual-cache`` runs the block's alone); the two compose rather than overlap.
- The estimate is only as good as the queries it reads: at a block's first forward they are
  those of mask tokens, which tell their positions and what the context made of them, not yet
  the tokens they will become. ref-dllm cannot measure the cost on long contexts (its plain
  ``retrieve`` accuracy is 0, card.json); on its short-prompt tasks that read the whole prompt
  (copy, reverse, sort) a density that drops prompt blocks drops accuracy, as it must.

Composition: with every decoding policy; with ``prefix-cache`` and ``dual-cache``, whose
block-start refresh is a full forward under the new selection and whose cached keys live only
within the block (so refreshing every step gives this term uncached, bit for bit). Caches whose
keys or features outlive a block (``dkv-cache``, ``elastic-cache``, ``dllm-cache``,
``spa-cache``) are refused: what they kept was computed under an earlier block's selection, so a
query would read, through them, prompt blocks this block did not select.

The term swaps the model's attention function (transformers' ``AttentionInterface``) for one
that reads the selection; ``remove()`` puts the model's own back. ``density=1`` keeps every
block and is the dense model bit for bit.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from cadence.accel.attention.patterns import keep_count, pooled
from cadence.accel.registry import param, register
from cadence.dllm.plan import install_term, plan_of
from cadence.dllm.policies import DllmTerm
from cadence.models.llada import dllm_family_of

STATE = "_cadence_prompt_sparse"  # on each attention module while the term is installed
BACKENDS = ("sdpa", "eager")  # attention functions that take a (B, heads, queries, keys) mask we can gather
EXACT_CACHES = ("prefix-cache", "dual-cache")
# selection order: the sinks, then the window, then the estimated mass (a probability, in [0, 1])
_SINK, _WINDOW, _NO_TOKEN = 3.0, 2.0, -1.0


@dataclass(frozen=True)
class PromptSparseConfig(DllmTerm):
    name = "prompt-sparse"
    summary = "canvas queries read the prompt's sink, window and top-scoring key blocks only (block top-k)"
    role = "sparse"
    compile_safe = False  # Python state per layer and block

    density: float = param(
        0.25,
        "share of the prompt's key blocks kept, rounded up to a whole block; 1 is dense",
        low=0.0,
        high=1.0,
        low_open=True,
        why="a share of the prompt's blocks",
    )
    block: int = param(64, "tokens per prompt key block (and per pooled query block)", low=1)
    sink: int = param(1, "first prompt blocks holding a real token, always kept (attention sinks)", low=0)
    window: int = param(1, "last prompt blocks before the canvas, always kept", low=0)
    queries: str = param(
        "canvas",
        "whose queries read only the selection: the canvas's, or all (the prompt's too)",
        choices=("canvas", "all"),
    )

    def check_composes(self, other) -> None:
        """Refuse a cache whose kept keys or features outlive the block (see the module docstring)."""
        if getattr(other, "role", None) == "cache" and other.name not in EXACT_CACHES:
            raise ValueError(
                f"{self} cannot compose with {other}: {other.name} keeps keys or features across "
                "blocks, computed under an earlier block's prompt selection, so a query would read "
                "through them prompt blocks this block did not select; use it with "
                f"{' or '.join(EXACT_CACHES)}, which recompute everything when a block starts"
            )


def key_valid(attention_mask: torch.Tensor | None, batch: int, prompt: int, device) -> torch.Tensor:
    """(B, prompt) bool: the prompt's key columns that are real tokens (not left padding), read
    from the mask row of the last query, a canvas token, which is never padding."""
    if attention_mask is None:
        return torch.ones(batch, prompt, dtype=torch.bool, device=device)
    row = attention_mask[:, 0, -1, :prompt]
    valid = row if row.dtype == torch.bool else row == 0  # additive masks: 0 where visible
    return valid.expand(batch, prompt)


def select_prompt_blocks(query, key, valid, prompt: int, config: PromptSparseConfig, scaling: float) -> torch.Tensor:
    """The prompt positions each row and key head keeps, ascending: (B, kv heads, kept tokens).

    query: (B, heads, q, D) the decoded block's queries; key: (B, kv heads, >= prompt, D);
    valid: (B, prompt) real tokens. Every row and head keeps the same number of blocks, and the
    last block whenever it is short, so the count of tokens is the same for all."""
    block, kv_heads = config.block, key.shape[1]
    blocks = -(-prompt // block)
    short = prompt % block != 0
    window = max(config.window, int(short))
    kept = min(blocks, max(keep_count(config.density, blocks), config.sink + window))
    pad = blocks * block - prompt
    weight = torch.nn.functional.pad(valid.float(), (0, pad)).unflatten(-1, (blocks, block))  # (B, blocks, block)
    tokens = weight.sum(-1)  # (B, blocks) real tokens per block
    keys = torch.nn.functional.pad(key[:, :, :prompt].float(), (0, 0, 0, pad)).unflatten(2, (blocks, block))
    # (B, kv heads, blocks, D): the mean of each block's real tokens
    pooled_keys = (keys * weight[:, None, :, :, None]).sum(3) / tokens.clamp_min(1)[:, None, :, None]
    pooled_queries = pooled(query, block).unflatten(1, (kv_heads, -1))  # (B, kv heads, group, q blocks, D)
    scores = pooled_queries @ pooled_keys[:, :, None].transpose(-1, -2) * scaling  # (B, kv, group, q blocks, blocks)
    empty = (tokens == 0)[:, None, None, None]
    mass = torch.softmax(scores.masked_fill(empty, float("-inf")), dim=-1).mean((2, 3))  # (B, kv heads, blocks)
    index = torch.arange(blocks, device=key.device)
    first = (tokens > 0).float().argmax(-1, keepdim=True)  # (B, 1): the first block holding a real token
    sink = (index >= first) & (index < first + config.sink)  # (B, blocks)
    priority = mass.masked_fill((tokens == 0)[:, None], _NO_TOKEN)
    priority = priority.masked_fill(index >= blocks - window, _WINDOW).masked_fill(sink[:, None], _SINK)
    order = torch.argsort(priority, dim=-1, descending=True, stable=True)[..., :kept].sort(-1).values
    positions = (order[..., None] * block + torch.arange(block, device=key.device)).flatten(-2)
    # the short last block is kept and sorts last: its columns past the prompt are the final `pad`
    return positions[..., : kept * block - pad]


def _gather(tensor: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """(B, kv heads, tokens, D) at ``columns`` (B, kv heads, k) -> (B, kv heads, k, D)."""
    return tensor.gather(2, columns[..., None].expand(-1, -1, -1, tensor.shape[-1]))


def _gather_mask(mask: torch.Tensor | None, columns: torch.Tensor, heads: int) -> torch.Tensor | None:
    """A (B or 1, 1 or heads, q, tokens) mask at the key ``columns`` (B, kv heads, k) of each head."""
    if mask is None:
        return None
    batch, kv_heads, _ = columns.shape
    if mask.shape[1] == 1 and kv_heads == 1:
        index = columns
    else:  # each query head reads its key head's columns
        index = columns.repeat_interleave(heads // kv_heads, dim=1)
        mask = mask.expand(-1, heads, -1, -1)
    mask = mask.expand(batch, -1, -1, -1)
    return mask.gather(-1, index[:, :, None, :].expand(-1, -1, mask.shape[2], -1))


class PromptSparse:
    """One application: the model's own attention function, and per layer the block's selection."""

    def __init__(self, config: PromptSparseConfig, model, attend):
        self.config, self.model, self.attend = config, model, attend
        self.selected: dict[int, torch.Tensor] = {}  # layer -> (B, kv heads, kept tokens) prompt positions
        self.made_for: dict[int, tuple] = {}  # layer -> the (generation, block, shape) its selection serves
        self.selections = self.kept_blocks = self.prompt_blocks = 0
        self.keys_read = self.keys_total = 0

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        plan = plan_of(self.model)
        if plan is None or plan.window is None:  # outside the engine the prompt's extent is unknown: dense
            return self.attend(module, query, key, value, attention_mask, **kwargs)
        low, high = plan.window
        prompt = low - plan.block_index * (high - low)  # the engine's blocks are of equal length
        (batch, kv_heads, tokens, _), heads = key.shape, query.shape[1]
        if prompt <= 0:
            return self.attend(module, query, key, value, attention_mask, **kwargs)
        layer, epoch = module.layer_idx, (plan.generation, plan.block_index, batch, tokens)
        if self.made_for.get(layer) != epoch:
            self._select(layer, epoch, query, key, attention_mask, low, high, prompt, kwargs)
        canvas = torch.arange(prompt, tokens, device=key.device).expand(batch, kv_heads, -1)
        columns = torch.cat((self.selected[layer], canvas), dim=-1)  # (B, kv heads, kept keys)
        sparse_key, sparse_value = _gather(key, columns), _gather(value, columns)
        self.keys_total += query.shape[2] * tokens
        full = query.shape[2] == tokens  # else a cached step: every query is a canvas token
        if self.config.queries == "all" or not full:
            self.keys_read += query.shape[2] * columns.shape[-1]
            output, _ = self.attend(
                module, query, sparse_key, sparse_value, _gather_mask(attention_mask, columns, heads), **kwargs
            )
            return output, None
        # the prompt's rows read every key, the canvas's the selection; outputs are (B, q, heads, D)
        rows = attention_mask is not None and attention_mask.shape[2] > 1
        prompt_mask = attention_mask[:, :, :prompt] if rows else attention_mask
        canvas_mask = attention_mask[:, :, prompt:] if rows else attention_mask
        self.keys_read += prompt * tokens + (tokens - prompt) * columns.shape[-1]
        dense, _ = self.attend(module, query[:, :, :prompt], key, value, prompt_mask, **kwargs)
        sparse, _ = self.attend(
            module, query[:, :, prompt:], sparse_key, sparse_value, _gather_mask(canvas_mask, columns, heads), **kwargs
        )
        return torch.cat((dense, sparse), dim=1), None

    def _select(self, layer, epoch, query, key, attention_mask, low, high, prompt, kwargs):
        if query.shape[2] != key.shape[2]:
            raise ValueError(
                f"{self.config}: the first forward of a block ran {query.shape[2]} of {key.shape[2]} "
                "queries; the selection needs the block's queries from a full forward (plain, or the "
                f"block-start refresh of {' or '.join(EXACT_CACHES)})"
            )
        valid = key_valid(attention_mask, key.shape[0], prompt, key.device)
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        selected = select_prompt_blocks(query[:, :, low:high], key, valid, prompt, self.config, scaling)
        self.selected[layer], self.made_for[layer] = selected, epoch
        blocks = -(-prompt // self.config.block)
        self.selections += 1
        self.prompt_blocks += blocks
        self.kept_blocks += -(-selected.shape[-1] // self.config.block)

    def stats(self) -> dict:
        """``selections`` made (one per layer and decoded block), ``prompt_density`` (kept / prompt
        blocks over them) and ``keys_read`` (query-key pairs attention read / those dense attention reads)."""
        return {
            "selections": self.selections,
            "prompt_density": self.kept_blocks / self.prompt_blocks if self.prompt_blocks else None,
            "keys_read": self.keys_read / self.keys_total if self.keys_total else None,
        }


def _dispatch(module, query, key, value, attention_mask, **kwargs):
    """The attention function the term registers: the module's application answers."""
    return getattr(module, STATE)(module, query, key, value, attention_mask, **kwargs)


def apply(model, config: PromptSparseConfig):
    from cadence.dllm import gemma

    family = dllm_family_of(model)  # refuses a model of no known family
    if family is gemma.GEMMA:
        raise ValueError(
            f"{config} cannot apply to {type(model).__name__}: its decoder reads the prompt from its "
            "encoder's KV cache, one canvas at a time, where this term selects over the one "
            "bidirectional sequence of prompt and generation of the LLaDA family; with prefix-cache "
            "its prompt is already encoded once per block"
        )
    attentions = [getattr(layer, family.attention) for layer in family.layer_list(model)]
    original = model.config._attn_implementation
    if original not in BACKENDS:
        raise ValueError(
            f"{config}: {type(model).__name__} runs attention_implementation={original!r}; the term "
            f"gathers the kept keys and the padding mask, which needs one of: {', '.join(BACKENDS)}"
        )
    if not all(hasattr(attention, "layer_idx") for attention in attentions):
        raise ValueError(
            f"{config}: the attention modules of {type(model).__name__} have no layer_idx to keep a "
            "selection per layer by"
        )
    eager = getattr(sys.modules[type(attentions[0]).__module__], "eager_attention_forward", None)
    attend = ALL_ATTENTION_FUNCTIONS["sdpa"] if original == "sdpa" else eager
    if attend is None:
        raise ValueError(f"{config}: {type(attentions[0]).__name__} has no eager_attention_forward to run")
    name = f"cadence_prompt_sparse_{original}"
    AttentionInterface.register(name, _dispatch)  # stateless: the state is on each attention module
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    state = PromptSparse(config, model, attend)

    def remove():
        model.config._attn_implementation = original
        for attention in attentions:
            delattr(attention, STATE)

    handle = install_term(model, "sparse", config, on_remove=remove, stats=state.stats)  # refuses unsound caches
    for attention in attentions:
        setattr(attention, STATE, state)
    model.config._attn_implementation = name
    return handle


register(PromptSparseConfig, apply)
