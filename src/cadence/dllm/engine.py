"""The masked-diffusion decoding loop, reading the model's plan (:mod:`cadence.dllm.plan`).

The canvas is the prompt followed by ``gen_length`` mask tokens. Block by block (one block
of ``gen_length`` unless a ``semi-ar`` term splits it), each step runs the model on the
canvas, and the plan's policy commits some of the block's masked positions to their argmax
tokens, until none is left. A KV-cache term, when present, answers the forwards from its
cache; the loop tells it which block is being decoded through the plan's window.

Prompts of different lengths are left-padded (attention mask and positions make the padding
invisible), so every row's generation starts at the same column and one window serves all.

Where a step's logits come from depends on the model: one bidirectional forward over the whole
canvas (the LLaDA family), or, for transformers' DiffusionGemma, its encoder over the prefix and
its decoder over the block with the undecided positions as noise (:mod:`cadence.dllm.gemma`,
which says what differs from the model's own ``generate``). The model's ``canvas_length``, where
it has one, is the block length.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from cadence.dllm import gemma
from cadence.dllm.plan import plan_of
from cadence.dllm.policies import plain_commit
from cadence.dllm.tokenizer import check_tokenizer


@dataclass
class Generation:
    texts: list[str]
    tokens: torch.Tensor  # (B, gen_length) generated ids
    forwards: int  # model calls
    seconds: float
    stats: dict = field(default_factory=dict)


def _encode(tokenizer, prompts) -> list[list[int]]:
    """Text prompts through the tokenizer ([BOS] + characters); token-id lists as they are."""
    return [tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else [int(token) for token in prompt]
            for prompt in prompts]


def check_request(model, tokenizer, prompts, gen_length: int) -> tuple[list[list[int]], int]:
    """Refuse, before any forward, what cannot be decoded; returns (prompt ids, block length)."""
    check_tokenizer(model, tokenizer)
    if isinstance(prompts, str):
        raise TypeError(f"prompts is a list of strings, got the string {prompts!r}; pass [{prompts!r}]")
    if not prompts:
        raise ValueError("no prompt to decode: prompts is empty")
    if not isinstance(gen_length, int) or gen_length < 1:
        raise ValueError(f"gen_length={gen_length!r} must be a positive integer")
    encoded = _encode(tokenizer, prompts)
    context = model.config.get_text_config().max_position_embeddings
    longest = max(map(len, encoded))
    if longest + gen_length > context:
        raise ValueError(f"a prompt of {longest} tokens plus gen_length={gen_length} is {longest + gen_length} tokens, "
                         f"longer than the model's context of {context}; shorten the prompt or use gen_length <= "
                         f"{max(0, context - longest)}")
    plan = plan_of(model)
    blocks = plan.terms.get("blocks") if plan else None
    # a model that denoises fixed canvases (DiffusionGemma) decodes in blocks of its canvas, and only those
    canvas = getattr(model.config, "canvas_length", None)
    block_length = blocks.block_length if blocks else canvas or gen_length
    if gen_length % block_length:
        lower, upper = gen_length // block_length * block_length, -(-gen_length // block_length) * block_length
        lengths = f"{lower} or {upper}" if lower else f"{upper}"
        other = "" if canvas else f", or a block_length that divides {gen_length}"
        raise ValueError(f"{blocks or type(model).__name__}: block_length={block_length} does not divide gen_length="
                         f"{gen_length}; use gen_length {lengths}{other}")
    return encoded, block_length


def _finished(canvas: torch.Tensor, start: int, mask_id: int, eos_id: int) -> torch.Tensor:
    """Rows whose first EOS in the generation is committed with every position before it decided."""
    generated = canvas[:, start:]
    is_eos = generated == eos_id
    first = torch.where(is_eos.any(-1), is_eos.float().argmax(-1), torch.full_like(is_eos[:, 0], generated.shape[1],
                                                                                     dtype=torch.long))
    position = torch.arange(generated.shape[1], device=canvas.device)
    undecided_before = ((generated == mask_id) & (position[None] < first[:, None])).any(-1)
    return is_eos.any(-1) & ~undecided_before


@torch.no_grad()
def decode_steps(model, tokenizer, prompts: list[str], gen_length: int, *, seed: int = 0):
    """Decode ``prompts``; yields ``(canvas, start)`` after every step (the canvas is (B, P +
    gen_length) token ids, the generation starts at column ``start``), then returns the
    number of forwards (``StopIteration.value``)."""
    encoded, block_length = check_request(model, tokenizer, prompts, gen_length)
    plan = plan_of(model)
    terms = plan.terms if plan else {}
    commit = terms["commit"].commit if "commit" in terms else plain_commit
    stop = "stop" in terms
    editing = terms.get("edit")
    mask_id, eos_id, pad_id = tokenizer.mask_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    if mask_id is None and gemma.is_diffusion_gemma(model):  # no mask token: any id not generated marks undecided
        mask_id = pad_id
    device = next(model.parameters()).device
    start = max(map(len, encoded))
    canvas = torch.full((len(encoded), start + gen_length), mask_id, dtype=torch.long)
    attention = torch.ones_like(canvas)
    for row, ids in enumerate(encoded):
        canvas[row, :start - len(ids)] = pad_id
        attention[row, :start - len(ids)] = 0
        canvas[row, start - len(ids):start] = torch.tensor(ids)
    canvas, attention = canvas.to(device), attention.to(device)
    padded = bool((attention == 0).any())
    position_ids = (attention.cumsum(-1) - 1).clamp_min(0)
    if gemma.is_diffusion_gemma(model):
        block_logits = gemma.CanvasDenoiser(model, attention, position_ids, mask_id, seed)
    else:
        inputs = {"attention_mask": attention if padded else None, "position_ids": position_ids}

        def block_logits(canvas, low, high):  # one forward over the whole canvas
            return model(input_ids=canvas, **inputs).logits[:, low:high]
    generator = torch.Generator().manual_seed(seed)
    forwards = 0
    if plan is not None:
        plan.generation += 1
    try:
        for block in range(gen_length // block_length):
            low, high = start + block * block_length, start + (block + 1) * block_length
            if plan is not None:
                plan.block_index, plan.window = block, (low, high)
            edits = 0
            while True:
                masked = canvas[:, low:high] == mask_id
                if not masked.any() and (editing is None or edits >= editing.max_steps):
                    break
                logits = block_logits(canvas, low, high).float()  # (B, block, vocab)
                never = torch.tensor([mask_id], device=logits.device)
                logits = logits.index_fill(-1, never, float("-inf"))  # out of place: a cache keeps the output
                forwards += 1
                if not masked.any():  # the block is filled: an editing step
                    edits += 1
                    replace = editing.edit(logits, canvas[:, low:high])
                    if not replace.any():
                        break
                    canvas[:, low:high] = torch.where(replace, logits.argmax(-1), canvas[:, low:high])
                    yield canvas, start
                    continue
                chosen = commit(logits, masked, generator)
                # every step decides at least one token of each unfinished row, whatever the policy
                stalled = masked.any(-1) & ~chosen.any(-1)
                if stalled.any():
                    chosen = chosen | (stalled[:, None] & plain_commit(logits, masked))
                canvas[:, low:high] = torch.where(chosen, logits.argmax(-1), canvas[:, low:high])
                if stop:
                    done = _finished(canvas, start, mask_id, eos_id)
                    canvas[:, start:] = torch.where(done[:, None] & (canvas[:, start:] == mask_id), eos_id,
                                                    canvas[:, start:])
                yield canvas, start
    finally:
        if plan is not None:
            plan.window, plan.block_index = None, -1
    return forwards


def generate(model, tokenizer, prompts: list[str], gen_length: int, *, seed: int = 0) -> Generation:
    """Decode ``prompts`` with the terms the model holds (plain decoding when none); the texts
    end at the first end-of-sequence token."""
    began = time.perf_counter()
    steps = decode_steps(model, tokenizer, prompts, gen_length, seed=seed)
    canvas, start = None, 0
    while True:
        try:
            canvas, start = next(steps)
        except StopIteration as end:
            forwards = end.value
            break
    if canvas is not None and canvas.is_cuda:
        torch.cuda.synchronize(canvas.device)
    seconds = time.perf_counter() - began
    tokens = canvas[:, start:].cpu() if canvas is not None else torch.empty(len(prompts), 0, dtype=torch.long)
    return Generation(texts=decode_answers(tokenizer, tokens), tokens=tokens, forwards=forwards, seconds=seconds)


def decode_answers(tokenizer, tokens: torch.Tensor) -> list[str]:
    """Each row's text up to its first end-of-sequence token, masks shown as '_'."""
    texts = []
    for row in tokens.tolist():
        if tokenizer.eos_token_id in row:
            row = row[:row.index(tokenizer.eos_token_id)]
        pieces = tokenizer.convert_ids_to_tokens(row)
        texts.append("".join("_" if token == tokenizer.mask_token_id else piece for token, piece in zip(row, pieces)))
    return texts
