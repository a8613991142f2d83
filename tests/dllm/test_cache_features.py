import math

import pytest
import torch

from cadence import dllm
from cadence.dllm import cache_features  # noqa: F401  (registers dllm-cache and spa-cache)
from cadence.dllm.plan import plan_of
from cadence.models.llada import build_llada

PROMPTS = ["12+34=", "copy:abc="]
PROMPT, GEN = 10, 16  # the longest prompt with [BOS] ("copy:abc=" is 9 characters); the generation
WIDTH = PROMPT + GEN


def decode(model, tokenizer, recipe=None):
    """(generation, stats, logits of every forward) under ``recipe``; plain decoding without one."""
    seen = []
    watch = model.register_forward_hook(lambda module, args, output: seen.append(output.logits.clone()))
    try:
        if recipe is None:
            return dllm.generate(model, tokenizer, PROMPTS, GEN), {}, seen
        with dllm.accelerate(model, recipe) as acceleration:
            return dllm.generate(model, tokenizer, PROMPTS, GEN), acceleration.stats(), seen
    finally:
        watch.remove()


@pytest.mark.parametrize(
    "cache",
    [
        "dllm-cache(prompt_every=1, response_every=1)",
        "dllm-cache(prompt_every=1, response_every=100, ratio=1.0)",
        "spa-cache(refresh_every=1)",
    ],
)
def test_recomputing_every_token_every_step_is_the_uncached_model_bit_for_bit(tiny, cache):
    """Every token recomputed runs each layer's own calls in its own order: not a float moves."""
    blocks = "semi-ar(block_length=4) + parallel(threshold=0.03)"
    plain, _, plain_logits = decode(*tiny, blocks)
    cached, stats, cached_logits = decode(*tiny, f"{blocks} + {cache}")
    assert torch.equal(cached.tokens, plain.tokens)
    assert len(cached_logits) == len(plain_logits) == stats["forwards"]
    assert all(torch.equal(a, b) for a, b in zip(cached_logits, plain_logits))
    assert stats["compute_fraction"] == 1.0


def _dllm_cache_rows(step, prompt_every=5, response_every=3, chosen=4):
    return PROMPT * (step % prompt_every == 0) + (GEN if step % response_every == 0 else chosen)


@pytest.mark.parametrize(
    "cache, rows_per_step, full",
    [
        ("dllm-cache(prompt_every=5, response_every=3, ratio=0.25)", _dllm_cache_rows, 2),  # both refresh at 0, 15
        ("spa-cache(ratio=0.25, refresh_every=8)", lambda step: WIDTH if step % 8 == 0 else 4, 2),
        ("spa-cache(ratio=0.3, refresh_every=8)", lambda step: WIDTH if step % 8 == 0 else math.ceil(0.3 * GEN), 2),
    ],
)
def test_the_compute_fraction_follows_the_schedule(tiny, cache, rows_per_step, full):
    """Plain decoding commits one token a step: 16 steps over a 26-token canvas (10 prompt, 16
    response); every layer recomputes the same number of rows, so layers cancel out."""
    generation, stats, _ = decode(*tiny, f"semi-ar(block_length=4) + {cache}")
    assert generation.forwards == stats["forwards"] == GEN
    assert stats["full_forwards"] == full and stats["cached_forwards"] == GEN - full
    assert stats["compute_fraction"] == pytest.approx(sum(map(rows_per_step, range(GEN))) / (GEN * WIDTH))


@pytest.mark.parametrize(
    "cache",
    [
        "dllm-cache(prompt_every=100, response_every=100)",
        "spa-cache(refresh_every=100)",
        "dllm-cache(prompt_every=2, response_every=100, ratio=0.5)",
    ],
)
def test_a_cached_step_on_an_unchanged_canvas_gives_the_full_forward(tiny, cache):
    """Splicing held features into a partial step is exact when nothing moved: it only reorders
    float work (a subset of queries through attention and the FFN), hence 1e-5 and not equality."""
    model, _ = tiny
    canvas = torch.randint(4, 59, (2, 24), generator=torch.Generator().manual_seed(0))
    canvas[:, 12:] = model.config.mask_token_id
    canvas[0, 13] = 7  # a committed token in the response
    attention_mask = torch.ones_like(canvas)
    attention_mask[1, :3] = 0  # a left-padded row
    inputs = {
        "input_ids": canvas,
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp_min(0),
    }
    full = model(**inputs).logits
    with dllm.accelerate(model, cache) as acceleration:
        refreshed = model(**inputs).logits
        cached = [model(**inputs).logits for _ in range(2)]
        stats = acceleration.stats()
    assert torch.equal(refreshed, full)
    assert stats["cached_forwards"] == 2 and stats["compute_fraction"] < 1
    for logits in cached:
        torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "cache",
    [
        "dllm-cache(prompt_every=100, response_every=100, ratio=0.0625)",
        "spa-cache(rank=4, ratio=0.0625, refresh_every=100)",
    ],
)
def test_the_token_that_changed_is_the_one_recomputed(tiny, cache):
    """At the first layer a token's input is its embedding: committing one token changes its
    values (and their singular proxy) and nobody else's, so a budget of one token goes to it."""
    model, _ = tiny
    canvas = torch.randint(4, 59, (1, 28), generator=torch.Generator().manual_seed(1))
    canvas[:, 12:] = model.config.mask_token_id  # 16 response tokens: ratio 1/16 is one of them
    positions = torch.arange(28)[None]
    recomputed = []
    watch = model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda module, args, kwargs: recomputed.append(kwargs["position_ids"].tolist()), with_kwargs=True
    )
    try:
        with dllm.accelerate(model, cache):
            model(input_ids=canvas, position_ids=positions)
            canvas[0, 21] = 9
            model(input_ids=canvas, position_ids=positions)
    finally:
        watch.remove()
    assert recomputed == [[list(range(28))], [[21]]]  # the refresh computes all; then the changed token alone


@pytest.mark.parametrize(
    "cache",
    [
        "dllm-cache(prompt_every=100, response_every=100, ratio=0.0625)",
        "spa-cache(rank=4, ratio=0.0625, refresh_every=100)",
    ],
)
def test_with_one_layer_the_recomputed_token_is_exact_after_a_change(cache):
    """One layer sees only embeddings, so after a token is committed its recomputed row (its
    fresh query over the spliced keys and values, then its FFN) is the uncached row exactly;
    the rows kept from the cache are the approximation."""
    torch.manual_seed(0)
    model = build_llada("tiny", num_hidden_layers=1).eval()
    canvas = torch.randint(4, 59, (1, 28), generator=torch.Generator().manual_seed(3))
    canvas[:, 12:] = model.config.mask_token_id
    with dllm.accelerate(model, cache):
        model(input_ids=canvas)
        canvas[0, 21] = 9
        cached = model(input_ids=canvas).logits
    full = model(input_ids=canvas).logits
    torch.testing.assert_close(cached[:, 21], full[:, 21], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cached[:, :12], full[:, :12], atol=1e-3)  # the prompt kept what it saw before


@pytest.mark.parametrize("cache", ["dllm-cache(response_every=3, ratio=0.5)", "spa-cache(rank=4, refresh_every=3)"])
@pytest.mark.parametrize(
    "policies",
    ["parallel(threshold=0.5) + token-editing(threshold=0.5) + eos-stop", "low-confidence(tokens_per_step=2)"],
)
def test_every_decoding_policy_decodes_to_the_end_under_the_cache(tiny, cache, policies):
    model, tokenizer = tiny
    generation, stats, _ = decode(model, tokenizer, f"semi-ar(block_length=4) + {policies} + {cache}")
    assert generation.tokens.shape == (2, GEN) and not (generation.tokens == tokenizer.mask_token_id).any()
    assert stats["forwards"] == generation.forwards and 0 < stats["compute_fraction"] < 1


@pytest.mark.parametrize("cache", ["dllm-cache", "spa-cache"])
def test_remove_restores_bit_identical_outputs(tiny, cache):
    model, tokenizer = tiny
    canvas = torch.randint(4, 59, (2, 20), generator=torch.Generator().manual_seed(2))
    canvas[:, 10:] = model.config.mask_token_id
    before = model(input_ids=canvas).logits
    plain = dllm.generate(model, tokenizer, PROMPTS, GEN)
    handle = dllm.accelerate(model, f"semi-ar(block_length=4) + {cache}")
    dllm.generate(model, tokenizer, PROMPTS, GEN)
    model(input_ids=canvas)
    handle.remove()
    assert plan_of(model) is None
    assert all(not layer._diffusers_hook.hooks for layer in model.model.layers)
    assert torch.equal(model(input_ids=canvas).logits, before)
    assert torch.equal(dllm.generate(model, tokenizer, PROMPTS, GEN).tokens, plain.tokens)


@pytest.mark.parametrize(
    "recipe, message",
    [
        ("dllm-cache(ratio=0)", r"dllm-cache: ratio=0(\.0)? must be in \(0\.0, 1\.0\]"),
        ("dllm-cache(ratio=1.5)", r"dllm-cache: ratio=1\.5 must be in \(0\.0, 1\.0\]"),
        ("dllm-cache(prompt_every=0)", r"dllm-cache: prompt_every=0 must be >= 1"),
        ("dllm-cache(response_every=0)", r"dllm-cache: response_every=0 must be >= 1"),
        ("spa-cache(rank=0)", r"spa-cache: rank=0 must be >= 1"),
        ("spa-cache(ratio=-0.1)", r"spa-cache: ratio=-0\.1 must be in \(0\.0, 1\.0\]"),
        ("spa-cache(refresh_every=0)", r"spa-cache: refresh_every=0 must be >= 1"),
        (
            "spa-cache(rank=97)",
            (
                r"spa-cache: rank=97 exceeds what the value projection of EuroBertForMaskedLM holds; "
                r"valid: 1 to 96"
            ),
        ),
        ("dllm-cache + dual-cache", r"already has a KV cache, dllm-cache; a dLLM recipe holds one KV cache"),
    ],
)
def test_bad_configuration_is_refused_naming_the_value_and_the_valid_ones(tiny, recipe, message):
    model, _ = tiny
    with pytest.raises(ValueError, match=message):
        dllm.accelerate(model, recipe)
    assert plan_of(model) is None and all(
        not layer._diffusers_hook.hooks for layer in model.model.layers if hasattr(layer, "_diffusers_hook")
    )


@pytest.mark.parametrize("cache", ["dllm-cache", "spa-cache"])
def test_llada2_pipeline_is_accelerated_and_restored(tiny, cache):
    from diffusers import BlockRefinementScheduler, LLaDA2Pipeline

    model, tokenizer = tiny
    pipe = LLaDA2Pipeline(model=model, scheduler=BlockRefinementScheduler(), tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    call = {
        "prompt": "12+34=",
        "use_chat_template": False,
        "gen_length": 16,
        "block_length": 4,
        "num_inference_steps": 4,
        "threshold": 0.95,
        "sampling_method": "greedy",
        "editing_threshold": None,
        "output_type": "seq",
    }
    plain = pipe(**call).sequences
    exact = "dllm-cache(prompt_every=1, response_every=1)" if cache == "dllm-cache" else "spa-cache(refresh_every=1)"
    with dllm.accelerate(pipe, exact):
        assert torch.equal(pipe(**call).sequences, plain)
    with dllm.accelerate(pipe, f"{cache}(ratio=0.5)") as acceleration:
        pipe(**call)
        stats = acceleration.stats()
    assert stats["cached_forwards"] > 0 and stats["compute_fraction"] < 1
    assert torch.equal(pipe(**call).sequences, plain)
