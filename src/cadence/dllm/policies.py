"""Decoding policies: which masked tokens of the current block a step commits.

Every policy reads the block's logits (B, block, vocab) and the mask of still-masked
positions and returns the positions to commit; the committed token is always the argmax
(greedy decoding, LLaDA's temperature 0). Without a policy term the engine decodes plainly:
one token per step, the most confident one (LLaDA's low-confidence remasking at
``steps = gen_length``), the baseline every speedup is measured against.

- ``low-confidence(tokens_per_step=k)``: the k most confident masked tokens (LLaDA,
  ``remasking='low_confidence'``); k = 1 is the plain decoding.
- ``random-remask(tokens_per_step=k)``: k masked positions drawn at random, the reverse
  process of masked diffusion as trained (LLaDA, ``remasking='random'``).
- ``parallel(threshold=t)``: every masked token whose confidence exceeds t, at least the most
  confident one (Fast-dLLM, Wu et al. 2025, Sec. 3.3). Strictly greater, so t = 1.0 commits
  exactly one token a step: the plain decoding.
- ``entropy-bounded(bound=g)``: the masked tokens in order of rising entropy while their
  summed entropy stays within g nats, at least one (the EB-sampler, Ben-Hamu et al. 2025,
  which transformers' DiffusionGemma uses).
- ``semi-ar(block_length=n)``: decode the canvas block by block, left to right (LLaDA's
  semi-autoregressive remasking); n must divide the generation length.
- ``token-editing(threshold=t, max_steps=n)``: once a block has no mask left, up to n more
  steps replace committed tokens whose argmax now differs with confidence above t, and stop
  at the first step that changes nothing (LLaDA2.1's editing, diffusers' ``editing_threshold``).
- ``eos-stop``: once a row has committed an end-of-sequence token with everything before it
  decided, fill the rest of its canvas with EOS (LLaDA2's ``eos_early_stop``, DiffusionGemma's
  adaptive stopping): the model was trained to write EOS there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cadence.accel.registry import TechniqueConfig, param, register
from cadence.dllm.plan import install_term


class DllmTerm(TechniqueConfig):
    level = "sequence"
    role = "commit"


def _top(score: torch.Tensor, masked: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
    """The ``count`` (per row, or the same for every row) masked positions of highest ``score``:
    (B, block) bool."""
    if isinstance(count, int):
        count = torch.full((len(masked),), count, dtype=torch.long, device=masked.device)
    score = score.masked_fill(~masked, float("-inf"))
    order = score.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return masked & (rank < count.clamp(max=masked.sum(-1))[:, None])


def confidence(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probability of the argmax token, argmax token) per position, in float32."""
    probs = torch.softmax(logits.float(), dim=-1)
    top, tokens = probs.max(dim=-1)
    return top, tokens


def plain_commit(logits, masked, generator=None):
    return _top(confidence(logits)[0], masked, 1)


@dataclass(frozen=True)
class LowConfidenceConfig(DllmTerm):
    name = "low-confidence"
    summary = "commit the k most confident masked tokens a step (LLaDA's low-confidence remasking)"

    tokens_per_step: int = param(1, "masked tokens committed per step; 1 is plain decoding", low=1)

    def commit(self, logits, masked, generator=None):
        return _top(confidence(logits)[0], masked, self.tokens_per_step)


@dataclass(frozen=True)
class RandomRemaskConfig(DllmTerm):
    name = "random-remask"
    summary = "commit k masked positions drawn at random (the reverse process; LLaDA's random remasking)"

    tokens_per_step: int = param(1, "masked positions committed per step", low=1)

    def commit(self, logits, masked, generator=None):
        score = torch.rand(masked.shape, generator=generator, device="cpu").to(masked.device)
        return _top(score, masked, self.tokens_per_step)


@dataclass(frozen=True)
class ParallelConfig(DllmTerm):
    name = "parallel"
    summary = "commit every masked token more confident than a threshold, at least one (Fast-dLLM)"

    threshold: float = param(0.9, "confidence a token must exceed to be committed; 1.0 is plain decoding",
                             low=0.0, high=1.0, low_open=True, why="a probability; 0 would commit every token at once")

    def commit(self, logits, masked, generator=None):
        top, _ = confidence(logits)
        sure = masked & (top > self.threshold)
        return sure | _top(top, masked & ~sure.any(-1, keepdim=True), 1)


@dataclass(frozen=True)
class EntropyBoundedConfig(DllmTerm):
    name = "entropy-bounded"
    summary = "commit masked tokens by rising entropy while their summed entropy stays within a bound (EB-sampler)"

    bound: float = param(0.1, "summed entropy (nats) the tokens committed in one step may carry; "
                              "DiffusionGemma's default 0.1", low=0.0, low_open=True)

    def commit(self, logits, masked, generator=None):
        probs = torch.softmax(logits.float(), dim=-1)
        entropy = torch.special.entr(probs).sum(-1).masked_fill(~masked, float("inf"))  # (B, block); 0 log 0 = 0
        ordered, order = entropy.sort(dim=-1, stable=True)
        within = (ordered.cumsum(-1) <= self.bound) & ordered.isfinite()
        within[:, 0] = ordered[:, 0].isfinite()  # at least one per row that has a masked token
        chosen = torch.zeros_like(masked)
        chosen.scatter_(1, order, within)
        return chosen & masked


@dataclass(frozen=True)
class SemiAutoregressiveConfig(DllmTerm):
    name = "semi-ar"
    summary = "decode the generation block by block, left to right (LLaDA's semi-autoregressive blocks)"
    role = "blocks"

    block_length: int = param(32, "tokens per block; must divide the generation length", low=1)


@dataclass(frozen=True)
class EosStopConfig(DllmTerm):
    name = "eos-stop"
    summary = "once a row has written EOS after a decided answer, fill the rest with EOS (adaptive stopping)"
    role = "stop"


@dataclass(frozen=True)
class TokenEditingConfig(DllmTerm):
    name = "token-editing"
    summary = "after a block is filled, replace committed tokens the model now prefers with confidence (LLaDA2.1)"
    role = "edit"

    threshold: float = param(0.9, "confidence the new token must exceed to replace a committed one",
                             low=0.0, high=1.0, low_open=True)
    max_steps: int = param(2, "editing steps a block may take after its last mask is filled", low=1)

    def edit(self, logits, canvas_block):
        """(B, block) bool: positions whose committed token is replaced by the argmax."""
        top, tokens = confidence(logits)
        return (tokens != canvas_block) & (top > self.threshold)


def _apply(model, config: DllmTerm):
    from cadence.dllm.gemma import check_block_length, is_diffusion_gemma

    if config.role == "blocks" and is_diffusion_gemma(model):
        check_block_length(model, config)
    return install_term(model, config.role, config)


for _config in (LowConfidenceConfig, RandomRemaskConfig, ParallelConfig, EntropyBoundedConfig,
                SemiAutoregressiveConfig, EosStopConfig, TokenEditingConfig):
    register(_config, _apply)
