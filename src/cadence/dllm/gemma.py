"""transformers' DiffusionGemma under cadence's dLLM engine: what carries over, what does not, and why.

DiffusionGemma (``DiffusionGemmaForBlockDiffusion``, transformers 5.11 and later) is not a
LLaDA-style masked-diffusion model, and three of its differences decide what cadence can do:

- **Block-causal encoder-decoder.** A causal encoder reads the prompt and every finished
  canvas into a KV cache; a bidirectional decoder denoises one canvas of
  ``config.canvas_length`` tokens, attending to that cache and to the canvas, and never writes
  the cache. Nothing after the canvas is ever an input.
- **Uniform-noise diffusion, no mask token.** A canvas starts as random vocabulary tokens; at
  every step each undecided position is redrawn at random, and the decoder also takes the
  previous step's logits (self-conditioning: their softmax, embedded, added to the input).
- **Its own sampler** (``generate``): multinomial sampling under a linear temperature schedule,
  the EB-sampler's acceptance over the whole canvas (a token accepted at one step may be
  redrawn at the next), the argmax of the last step as the output, and adaptive stopping (the
  argmax canvas stable and its mean entropy low) within ``max_denoising_steps``.

How cadence's engine decodes it (:class:`CanvasDenoiser`): the engine's block is the model's
canvas (``semi-ar`` must name ``canvas_length`` or be left out), the engine's masked positions
are the undecided ones, which the decoder sees as fresh seeded noise, committed positions keep
their token, and each step self-conditions on the previous step's logits within the block. So
every decoding policy applies (``parallel``, ``low-confidence``, ``entropy-bounded``,
``random-remask``, ``token-editing``, ``eos-stop``), with two differences from ``generate``
that are cadence's on purpose: a committed token stays committed (LLaDA's low-confidence
remasking, greedy, where ``generate`` samples and may redraw an accepted token), and
self-conditioning uses the logits at temperature 1, because the temperature schedule is a
function of ``max_denoising_steps``, which cadence's loop does not have (its steps follow from
the policy). cadence's ``entropy-bounded`` bounds the summed entropy of the tokens it commits;
``generate``'s EB-sampler bounds that sum less its largest term, a looser test.
``generate`` itself is the peer (``peer:diffusion-gemma`` in :mod:`cadence.dllm.bench`).

Plain decoding re-encodes the prompt and the finished blocks at every step, as plain LLaDA
decoding runs its full forward at every step. Of the caches:

- ``prefix-cache`` (Fast-dLLM) encodes them once per block (and every ``refresh_every`` steps):
  **exact**, bit for bit, at every setting, because the encoder is causal and what it reads does
  not change inside a block. ``generate`` caches natively too (extending its cache by each
  finished canvas, where a refresh here encodes the whole prefix afresh: see :func:`apply_cache`).
- ``dual-cache`` is the same cache here: the suffix after the block that Fast-dLLM's dual cache
  adds is not an input of this model, so there is nothing more to reuse.
- ``dkv-cache``, ``elastic-cache``, ``dllm-cache`` and ``spa-cache`` are refused: see
  ``NOT_APPLICABLE`` for each term's reason.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from cadence.dllm.plan import install_term, plan_of
from cadence.models.llada import DllmFamily, register_dllm_family

MODEL_CLASS = "DiffusionGemmaForBlockDiffusion"
STATE = "_cadence_dllm_encoder_cache"  # the prefix cache's counters, on the model while the term is installed

GEMMA = register_dllm_family(
    DllmFamily(
        name="diffusion-gemma",
        classes=(MODEL_CLASS,),
        layers="model.decoder.layers",
        attention="self_attn",
        # no semi-ar term: the block is the model's canvas_length (256 for google/diffusiongemma-26B-A4B-it)
        recipe="parallel(threshold=0.9) + prefix-cache",
        configs={
            # a CPU-sized model for tests: ref-dllm's character tokenizer ids (pad 0, bos 1, eos 2), two
            # layers (one sliding-window, one full, as Gemma alternates them), two experts, canvases of 8
            "tiny": {
                "text_config": {
                    "vocab_size": 59,
                    "hidden_size": 64,
                    "intermediate_size": 128,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 2,
                    "num_key_value_heads": 1,
                    "head_dim": 16,
                    "global_head_dim": 16,
                    "max_position_embeddings": 512,
                    "sliding_window": 16,
                    "num_experts": 2,
                    "top_k_experts": 1,
                    "moe_intermediate_size": 32,
                    "layer_types": ["sliding_attention", "full_attention"],
                    "pad_token_id": 0,
                    "bos_token_id": 1,
                    "eos_token_id": 2,
                },
                # the vision tower is built whatever the use: the smallest Gemma 4 one
                "vision_config": {
                    "model_type": "gemma4_vision",
                    "hidden_size": 16,
                    "intermediate_size": 32,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 1,
                    "num_key_value_heads": 1,
                    "head_dim": 16,
                },
                "canvas_length": 8,
            },
        },
    )
)

# The caches that cannot serve this model, and why (named in the refusal).
_LLAMA_HALVES = (
    "it runs a Llama layer's attention and FFN halves apart; DiffusionGemma's layers add sandwich norms "
    "and a mixture of experts beside the FFN, which it does not know"
)
NOT_APPLICABLE = {
    "dkv-cache": (
        "the prompt and finished blocks it would freeze are already in the encoder's exact cache (prefix-cache); "
        "what is left, freezing committed canvas tokens inside a decoder that reads a cache but writes none, "
        "is not adapted to this model"
    ),
    "elastic-cache": (
        "its drift test decides when cached keys have gone stale; the encoder's cache of the prefix is causal and "
        "never goes stale inside a block, so there is nothing to decide: use prefix-cache, exact here"
    ),
    "dllm-cache": _LLAMA_HALVES,
    "spa-cache": _LLAMA_HALVES,
}


def is_diffusion_gemma(model) -> bool:
    return type(model).__name__ == MODEL_CLASS


def build_diffusion_gemma(size: str = "tiny", **overrides):
    """A randomly initialised DiffusionGemma of a named size (``GEMMA.configs``)."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    if size not in GEMMA.configs:
        raise ValueError(f"unknown DiffusionGemma size {size!r}; valid: {', '.join(GEMMA.configs)}")
    config = DiffusionGemmaConfig(**{**GEMMA.configs[size], **overrides})
    config._attn_implementation = "sdpa"
    return DiffusionGemmaForBlockDiffusion(config)


def check_block_length(model, config) -> None:
    """Refuse a ``semi-ar`` block other than the model's canvas: DiffusionGemma's decoder was
    trained to denoise canvases of ``canvas_length`` tokens after an encoded prefix."""
    canvas = model.config.canvas_length
    if config.block_length != canvas:
        raise ValueError(
            f"{config}: {type(model).__name__} denoises canvases of canvas_length={canvas} tokens, its "
            f"block; use semi-ar(block_length={canvas}), or leave semi-ar out"
        )


def _cache_keyword(module) -> str:
    """transformers 5.2x names the cache ``cache``; earlier releases ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(type(module).forward).parameters else "past_key_values"


@dataclass
class EncoderCache:
    """The prefix cache's state on a DiffusionGemma: when the prefix was encoded, and the work counted."""

    refresh_every: int
    full_forwards: int = 0  # steps that encoded the prefix
    cached_forwards: int = 0  # steps served from the kept encoding
    computed_tokens: int = 0
    total_tokens: int = 0

    def stats(self) -> dict:
        return {
            "full_forwards": self.full_forwards,
            "cached_forwards": self.cached_forwards,
            "forwards": self.full_forwards + self.cached_forwards,
            "compute_fraction": self.computed_tokens / self.total_tokens if self.total_tokens else None,
        }


def apply_cache(model, config):
    """A cache term on a DiffusionGemma: Fast-dLLM's prefix cache (Wu et al. 2025, Sec. 3.2),
    read by :class:`CanvasDenoiser`; no hook, since the model's own forward takes the cache.

    Where it differs from the paper: the paper's cache is approximate (a bidirectional model's
    cached keys do not see the tokens committed since); here the prefix is encoded by a causal
    encoder and never changes inside a block, so keeping it is exact at every ``refresh_every``.
    ``dual-cache`` is the same cache: the suffix it would add is not an input of this model.
    Where it differs from ``generate``: a refresh encodes the whole prefix afresh, where
    ``generate`` extends its cache by the newly finished canvas alone; that costs one encoding of
    the prefix per canvas, and keeps the cached decoding equal to the uncached one bit for bit
    (an extended cache computes the same keys by other matrix shapes, equal only to rounding)."""
    if config.name not in ("prefix-cache", "dual-cache"):
        why = NOT_APPLICABLE.get(config.name, "it is not adapted to this architecture")
        raise ValueError(
            f"{config}: not applicable to {type(model).__name__}: {why}; valid caches here: "
            "prefix-cache, dual-cache (the same exact cache of the encoded prefix)"
        )
    state = EncoderCache(config.refresh_every)

    def remove():
        if getattr(model, STATE, None) is state:
            delattr(model, STATE)

    handle = install_term(model, "cache", config, on_remove=remove, stats=state.stats)  # refuses a second cache
    setattr(model, STATE, state)
    return handle


class CanvasDenoiser:
    """One generation on a DiffusionGemma: ``denoiser(canvas, low, high)`` gives the logits of
    the block ``[low, high)`` (B, canvas, vocab), the canvas holding ``undecided_id`` where
    nothing is committed yet. Keeps the encoded prefix and the last step's logits of the block."""

    def __init__(self, model, attention, position_ids, undecided_id: int, seed: int):
        self.model, self.position_ids, self.undecided_id = model, position_ids, undecided_id
        self.attention = attention if bool((attention == 0).any()) else None  # (B, tokens); None: no padding
        self.vocab_size = model.config.get_text_config().vocab_size
        self.noise = torch.Generator().manual_seed(seed)  # the redrawn tokens: seeded, drawn on the CPU
        self.keyword = _cache_keyword(model.model.decoder)
        self.block = self.prefix = self.previous = None
        self.steps_since_encoding = 0

    def __call__(self, canvas, low: int, high: int) -> torch.Tensor:
        if (low, high) != self.block:  # a new canvas: no self-conditioning yet (generate's first step)
            self.block, self.prefix, self.previous = (low, high), None, None
        prefix = self._encoded_prefix(canvas, low, high)
        block = canvas[:, low:high]
        noise = torch.randint(self.vocab_size, block.shape, generator=self.noise).to(block.device)
        decoder_ids = torch.where(block == self.undecided_id, noise, block)
        attention = None if self.attention is None else self.attention[:, :high].bool()
        logits = self.model(
            decoder_input_ids=decoder_ids,
            self_conditioning_logits=self.previous,
            decoder_attention_mask=attention,
            decoder_position_ids=self.position_ids[:, low:high],
            **{self.keyword: prefix},
        ).logits  # (B, canvas, vocab), float32
        self.previous = logits
        return logits

    def _encoded_prefix(self, canvas, low, high):
        """The encoder's cache of canvas[:, :low]: fresh at every step, unless a cache term keeps it."""
        state = getattr(self.model, STATE, None)
        plan = plan_of(self.model)
        cached = state is not None and plan is not None and "cache" in plan.terms
        every = state.refresh_every if cached else 1
        keep = cached and self.prefix is not None and not (every and self.steps_since_encoding + 1 >= every)
        if cached:
            state.total_tokens += canvas.shape[0] * high
            state.computed_tokens += canvas.shape[0] * ((high - low) if keep else high)
            state.cached_forwards += keep
            state.full_forwards += not keep
        if keep:
            self.steps_since_encoding += 1
            return self.prefix
        self.prefix, self.steps_since_encoding = self._encode(canvas, low), 0
        return self.prefix

    def _encode(self, canvas, low):
        from transformers import DynamicCache

        encoder = self.model.model.encoder
        cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
        attention = None if self.attention is None else self.attention[:, :low]
        encoder(
            input_ids=canvas[:, :low],
            attention_mask=attention,
            position_ids=self.position_ids[:, :low],
            **{_cache_keyword(encoder): cache},
        )
        return cache


# ------------------------------------------------------------------------------ the peer

# generate's own defaults (DiffusionGemmaGenerationConfig._get_default_generation_params, transformers 5.24)
PEER_SETTINGS = {
    "entropy_bound": (float, "the EB-sampler's bound (nats); generate's default 0.1"),
    "max_denoising_steps": (int, "denoising steps a canvas may take; generate's default 48"),
}


def parse_peer_settings(text: str) -> dict:
    """``entropy_bound=1.0, max_denoising_steps=16`` -> their values; unknown or bad ones refused."""
    settings = {}
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in PEER_SETTINGS:
            raise ValueError(f"peer:diffusion-gemma: unknown setting {name!r}; valid: {', '.join(PEER_SETTINGS)}")
        kind, meaning = PEER_SETTINGS[name]
        try:
            settings[name] = kind(value)
        except ValueError:
            raise ValueError(f"peer:diffusion-gemma: {name}={value!r} is not a {kind.__name__} ({meaning})") from None
        if settings[name] <= 0:
            raise ValueError(f"peer:diffusion-gemma: {name}={value} must be positive ({meaning})")
    return settings


def decode_with_generate(model, tokenizer, prompts, gen_length: int, settings: dict, seed: int = 0):
    """DiffusionGemma's own ``generate`` on ``prompts``: (token rows (B, gen_length), decoder
    forwards). Seeded (it samples) without touching the caller's random state."""
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    canvas = model.config.canvas_length
    if gen_length % canvas:
        raise ValueError(
            f"peer:diffusion-gemma: gen_length={gen_length} is not a whole number of canvases of "
            f"{canvas} tokens; use a multiple of {canvas}"
        )
    encoded = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    device = next(model.parameters()).device
    options = {"max_denoising_steps": settings["max_denoising_steps"]} if "max_denoising_steps" in settings else {}
    if "entropy_bound" in settings:
        options["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=settings["entropy_bound"])
    forwards = 0

    def count(*_):
        nonlocal forwards
        forwards += 1

    # generate calls the model's forward directly (no module hook fires there); its decoder is a called module
    handle = model.model.decoder.register_forward_hook(count)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            output = model.generate(
                encoded["input_ids"].to(device),
                attention_mask=encoded["attention_mask"].to(device),
                max_new_tokens=gen_length,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **options,
            )
    finally:
        handle.remove()
    prompt_length = encoded["input_ids"].shape[1]
    return output.sequences[:, prompt_length : prompt_length + gen_length].cpu(), forwards
