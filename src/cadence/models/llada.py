"""The LLaDA family of masked-diffusion language models, as transformers ships it.

LLaDA (Nie et al., 2025) is a Llama transformer (RMSNorm, SwiGLU, rotary positions,
optionally grouped keys and values) whose attention is bidirectional and whose head predicts
every masked token at once. transformers' ``EuroBertForMaskedLM`` is exactly that
architecture: Llama blocks with ``is_causal = False`` and an untied masked-LM head, taking
``attention_mask`` and ``position_ids`` and returning ``.logits``, which is the contract of
diffusers' ``LLaDA2Pipeline``. It is therefore the class ref-dllm uses and the one the
real-size benchmark builds at the LLaDA-8B configuration. (The LLaDA and LLaDA2 checkpoints
themselves ship as remote code, which cadence cannot load without a hub; transformers'
``DiffusionGemma`` is an encoder-decoder with self-conditioning, a different decoding loop:
its family is registered, and its adaptation explained, in ``cadence.dllm.gemma``.)

A diffusion-LM family is not a diffusion-transformer :class:`~cadence.models.family.Family`:
there is no token layout of frames, no timestep and no modulated input; what the dLLM engine
needs is where the layers and their attention are, how attention reads keys and values (the
``cache`` argument of transformers' attention, which the KV caches fill) and the default
recipe. One :class:`DllmFamily` holds that, registered here the way DiT families register.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class DllmFamily:
    """One masked-diffusion LM family.

    - ``classes``: the model class names it adapts (matched by exact name).
    - ``layers``: dotted path of the layer list inside the model, in execution order.
    - ``attention``: the layer attribute holding self-attention, whose forward passes its
      keys and values through ``cache.update(key, value, layer_idx)`` (transformers' Cache
      contract): the dLLM KV caches answer that call.
    - ``recipe``: the default fast recipe (a recipe string; see benchmarks/RESULTS.md).
    - ``configs``: named model sizes (keyword arguments of the config class).
    """

    name: str
    classes: tuple[str, ...]
    layers: str
    attention: str
    recipe: str
    configs: dict[str, dict] = field(default_factory=dict)

    def layer_list(self, model):
        found = model
        for part in self.layers.split("."):
            found = getattr(found, part)
        return found


_DLLM_FAMILIES: dict[str, DllmFamily] = {}


def register_dllm_family(family: DllmFamily) -> DllmFamily:
    taken = {name for other in _DLLM_FAMILIES.values() for name in (other.name, *other.classes)}
    clashes = sorted(taken & {family.name, *family.classes})
    if clashes:
        raise ValueError(f"cannot register dLLM family {family.name!r}: already registered: {', '.join(clashes)}")
    _DLLM_FAMILIES[family.name] = family
    return family


def dllm_family_of(model) -> DllmFamily:
    name = type(model).__name__
    for family in _DLLM_FAMILIES.values():
        if name in family.classes:
            return family
    supported = sorted(cls for family in _DLLM_FAMILIES.values() for cls in family.classes)
    raise ValueError(f"no cadence dLLM adapter for {name}; supported: {', '.join(supported)}")


# ids shared by every config: ref-dllm's character tokenizer (cadence.dllm.tokenizer) puts its
# special tokens first; the real-size configs keep LLaDA's vocabulary size.
_SPECIAL_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, mask_token_id=3)

LLADA = register_dllm_family(DllmFamily(
    name="llada",
    classes=("EuroBertForMaskedLM",),
    layers="model.layers",
    attention="self_attn",
    # Fast-dLLM's composition; the threshold is the paper's 0.9 (ref-dllm frontier:
    # benchmarks/RESULTS.md, "Diffusion language models").
    recipe="semi-ar(block_length=32) + parallel(threshold=0.9) + dual-cache",
    configs={
        # ref-dllm: 5.1 M parameters, 10 MB in bf16: the tracked tree travels to the GPU machine
        # within a 64 MiB limit that the other reference checkpoints already fill to 37 MiB.
        # Context 1,024 holds the longest task prompt (tasks.MAX_PROMPT) and a 512-token generation.
        "ref-dllm": dict(vocab_size=59, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                         num_attention_heads=4, max_position_embeddings=1024, **_SPECIAL_IDS),
        # a CPU-sized model for tests and the trainer's CPU proof
        "tiny": dict(vocab_size=59, hidden_size=96, intermediate_size=256, num_hidden_layers=3,
                     num_attention_heads=3, max_position_embeddings=512, **_SPECIAL_IDS),
        # LLaDA-8B (GSAI-ML/LLaDA-8B-Instruct config.json): 32 layers, 4,096 wide, 32 heads
        # without grouping, SwiGLU 12,288, vocabulary 126,464, rope theta 500,000.
        "llada-8b": dict(vocab_size=126464, hidden_size=4096, intermediate_size=12288, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                         pad_token_id=126081, bos_token_id=126080, eos_token_id=126081, mask_token_id=126336),
        # LLaDA-MoE-7B-A1B (inclusionAI; its LLaDAMoEConfig defaults): 16 layers, 2,048 wide, 16 heads,
        # 64 experts of SwiGLU 1,024 with 8 routed a token (softmax router, no renormalisation of the
        # top 8), vocabulary 157,184. Its special ids are not in that config: these are placeholders,
        # which random weights do not care about. What differs from the checkpoint: no QK-norm
        # (EuroBert's attention has none; two RMSNorms per layer over q and k), OLMoE's router
        # and experts from transformers (the architecture LLaDA-MoE's modeling code derives from).
        "llada-moe-7b-a1b": dict(vocab_size=157184, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                                 num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=8192,
                                 rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
                                 pad_token_id=156892, bos_token_id=156891, eos_token_id=156892,
                                 mask_token_id=156895, experts=dict(num_experts=64, num_experts_per_tok=8)),
        # the same MoE layout at a CPU size, for its test
        "tiny-moe": dict(vocab_size=59, hidden_size=96, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=3, max_position_embeddings=512, experts=dict(num_experts=4,
                         num_experts_per_tok=2), **_SPECIAL_IDS),
    },
))


def build_llada(size: str = "ref-dllm", **overrides):
    """A randomly initialised LLaDA-architecture model of a named size (``LLADA.configs``).

    A size with ``experts`` is a mixture of experts: every layer's SwiGLU is replaced by transformers'
    OLMoE sparse block (router and experts; ``intermediate_size`` is then an expert's width). The
    model stays an ``EuroBertForMaskedLM``, so the engine and every cache take it unchanged; the
    experts run through transformers' ``grouped_mm`` kernel where it has one (one grouped GEMM a
    projection instead of a loop over the experts)."""
    from transformers import EuroBertConfig, EuroBertForMaskedLM

    if size not in LLADA.configs:
        raise ValueError(f"unknown LLaDA size {size!r}; valid: {', '.join(LLADA.configs)}")
    settings = {**LLADA.configs[size], **overrides}
    experts = settings.pop("experts", None)
    config = EuroBertConfig(**settings)
    config._attn_implementation = "sdpa"
    model = EuroBertForMaskedLM(config)
    if experts:
        for layer in model.model.layers:
            layer.mlp = _MixtureOfExperts(config, **experts)
    return model


class _MixtureOfExperts(torch.nn.Module):
    """transformers' OLMoE sparse block in a SwiGLU's place, initialised as the model's linears are."""

    def __init__(self, config, num_experts: int, num_experts_per_tok: int):
        from transformers import OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

        super().__init__()
        moe = OlmoeConfig(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                          num_experts=num_experts, num_experts_per_tok=num_experts_per_tok, norm_topk_prob=False,
                          hidden_act=config.hidden_act)
        moe._experts_implementation = "grouped_mm" if _has_grouped_mm() else "eager"
        self.experts_implementation = moe._experts_implementation
        self.block = OlmoeSparseMoeBlock(moe)
        for parameter in self.block.parameters():
            torch.nn.init.normal_(parameter, std=config.initializer_range)

    def forward(self, hidden_states):
        out = self.block(hidden_states)
        return out[0] if isinstance(out, tuple) else out  # transformers before 5.x returned the router logits too


def _has_grouped_mm() -> bool:
    from transformers.integrations import moe

    return "grouped_mm" in getattr(moe, "ALL_EXPERTS_FUNCTIONS", ()) and (
        hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm"))
