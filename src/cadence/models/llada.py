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
    },
))


def build_llada(size: str = "ref-dllm", **overrides):
    """A randomly initialised LLaDA-architecture model of a named size (``LLADA.configs``)."""
    from transformers import EuroBertConfig, EuroBertForMaskedLM

    if size not in LLADA.configs:
        raise ValueError(f"unknown LLaDA size {size!r}; valid: {', '.join(LLADA.configs)}")
    config = EuroBertConfig(**{**LLADA.configs[size], **overrides})
    config._attn_implementation = "sdpa"
    return EuroBertForMaskedLM(config)
