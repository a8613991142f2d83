"""ref-dllm's character tokenizer, built with the ``tokenizers`` library and wrapped as a
transformers ``PreTrainedTokenizerFast`` (what diffusers' ``LLaDA2Pipeline`` and every
transformers user expect: ``mask_token_id``, ``eos_token_id``, ``batch_decode``).

One token per character: the synthetic tasks check answers digit by digit, and a BPE merge
of "12" would let the model copy digits without computing them. The tokenizer is saved beside
the checkpoint (tokenizer.json) and checked against the model before any decoding.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

PAD, BOS, EOS, MASK, UNK = "[PAD]", "[BOS]", "[EOS]", "[MASK]", "[UNK]"
SPECIALS = (PAD, BOS, EOS, MASK, UNK)
# Everything the task prompts and answers are written with (tasks.py).
CHARACTERS = string.digits + string.ascii_lowercase + " +-*=:;,.?()[]{}<>"


def build_tokenizer():
    """The character tokenizer: ids 0-4 are the special tokens, then one id per character."""
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate((*SPECIALS, *CHARACTERS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every character its own token
    core.decoder = decoders.Fuse()  # characters join back without spaces between them
    # a prompt starts with [BOS], as in training, whoever tokenizes it (LLaDA2Pipeline does)
    core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    # left padding, as generation wants it: a batch's answers start in one column (LLaDA2Pipeline)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   mask_token=MASK, unk_token=UNK, padding_side="left")


def load_tokenizer(directory: str | Path):
    from transformers import PreTrainedTokenizerFast

    path = Path(directory)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {str(path)!r}: a ref-dllm checkpoint keeps its tokenizer there")
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def check_tokenizer(model, tokenizer) -> None:
    """Refuse a tokenizer that does not match the model: another vocabulary size, or other ids
    for the mask and end-of-sequence tokens (decoding would write and stop on wrong tokens)."""
    from cadence.dllm.gemma import is_diffusion_gemma

    config = model.config.get_text_config()  # a composite config (DiffusionGemma's) keeps its vocabulary there
    found = {"vocabulary size": len(tokenizer), "mask_token_id": tokenizer.mask_token_id,
             "eos_token_id": tokenizer.eos_token_id}
    expected = {"vocabulary size": config.vocab_size, "mask_token_id": getattr(config, "mask_token_id", None),
                "eos_token_id": config.eos_token_id}
    if is_diffusion_gemma(model):  # uniform-noise diffusion: no mask token to agree on
        del found["mask_token_id"], expected["mask_token_id"]
    if isinstance(config.eos_token_id, (list, tuple)) and tokenizer.eos_token_id in config.eos_token_id:
        expected["eos_token_id"] = tokenizer.eos_token_id  # one of the model's end tokens (Gemma lists several)
    wrong = [f"{key} {found[key]!r} (the model's: {expected[key]!r})" for key in found if found[key] != expected[key]]
    if wrong:
        raise ValueError(f"the tokenizer does not match the model: {'; '.join(wrong)}; load the tokenizer saved "
                         "beside the checkpoint (cadence.dllm.load)")
