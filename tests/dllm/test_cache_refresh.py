import pytest
import torch

import cadence.dllm.cache_refresh  # noqa: F401  (registers dkv-cache and elastic-cache)
from cadence import dllm
from cadence.dllm.cache_refresh import DkvCacheConfig, ElasticCacheConfig
from cadence.dllm.plan import plan_of

PROMPTS = ["12+34=", "copy:abc="]
WIDTH = 10 + 16  # the longest prompt with [BOS] ("copy:abc=" is 9 characters) and the generation
BLOCKS = "semi-ar(block_length=4) + parallel(threshold=0.03)"
# every step fills the whole block, in every row: the active positions are the same in both rows
WHOLE_BLOCKS = "semi-ar(block_length=4) + low-confidence(tokens_per_step=4)"


def decode(model, tokenizer, recipe=None):
    if recipe is None:
        return dllm.generate(model, tokenizer, PROMPTS, 16)
    with dllm.accelerate(model, recipe) as acceleration:
        return dllm.generate(model, tokenizer, PROMPTS, 16), acceleration.stats()


@pytest.mark.parametrize("cache", ["dkv-cache(refresh_every=1)", "dkv-cache(delay=3, refresh_every=1)",
                                   "elastic-cache(threshold=1.0)", "elastic-cache(threshold=0.5, refresh_every=1)"])
def test_refreshing_every_step_is_the_uncached_model_bit_for_bit(tiny, cache):
    plain = decode(*tiny, BLOCKS)[0]
    cached, stats = decode(*tiny, f"{BLOCKS} + {cache}")
    assert torch.equal(cached.tokens, plain.tokens)
    assert stats["cached_forwards"] == 0 and stats["full_forwards"] == cached.forwards
    assert stats["compute_fraction"] == 1.0


@pytest.mark.parametrize("cache, active", [
    # one refresh, then the masked positions plus the block committed on the step before (delay 1) ...
    ("dkv-cache", [12 + 4, 8 + 4, 4 + 4]),
    # ... or on the two steps before (delay 2)
    ("dkv-cache(delay=2)", [12 + 4, 8 + 4 + 4, 4 + 4 + 4]),
    # a refresh on steps 0 and 2: step 1 computes 12 masked + 4 committed, step 3 4 masked + 4 committed
    ("dkv-cache(refresh_every=2)", [12 + 4, WIDTH, 4 + 4]),
])
def test_dkv_computes_the_masked_and_the_just_committed_tokens(tiny, cache, active):
    generation, stats = decode(*tiny, f"{WHOLE_BLOCKS} + {cache}")
    assert generation.forwards == 4
    refreshes = 1 + active.count(WIDTH)
    assert stats["full_forwards"] == refreshes and stats["cached_forwards"] == 4 - refreshes
    assert stats["compute_fraction"] == pytest.approx((WIDTH + sum(active)) / (4 * WIDTH))


def test_elastic_cache_without_drift_is_the_dual_cache(tiny):
    """No attention drifts below a threshold near 0: one refresh a block, the block computed."""
    dual, dual_stats = decode(*tiny, f"{BLOCKS} + dual-cache")
    elastic, stats = decode(*tiny, f"{BLOCKS} + elastic-cache(threshold=1e-6)")
    assert torch.equal(elastic.tokens, dual.tokens)
    assert stats["drift_refreshes"] == 0
    assert {key: stats[key] for key in dual_stats} == dual_stats
    assert stats["full_forwards"] == 4 and stats["compute_fraction"] == pytest.approx((4 * WIDTH + 12 * 4) /
                                                                                      (16 * WIDTH))


# thresholds inside the spread of the seeded tiny model's similarities at that layer
@pytest.mark.parametrize("layer, threshold, depth_computed", [(-1, 0.99995, 3 / 3), (0, 0.999, 1 / 3)])
def test_elastic_refreshes_cost_what_they_count(tiny, layer, threshold, depth_computed):
    """At a threshold that some steps' drift crosses, each drift refresh costs a full forward
    plus the abandoned block through the watched layer (the deepest: all 3 layers; layer 0: one)."""
    generation, stats = decode(*tiny, f"{BLOCKS} + elastic-cache(threshold={threshold}, layer={layer})")
    drifts = stats["drift_refreshes"]
    assert 0 < drifts < stats["cached_forwards"] + drifts
    assert stats["full_forwards"] == 4 + drifts and stats["forwards"] == generation.forwards
    computed = stats["full_forwards"] * WIDTH + stats["cached_forwards"] * 4 + drifts * 4 * depth_computed
    assert stats["compute_fraction"] == pytest.approx(computed / (generation.forwards * WIDTH))


def _canvas(masked_from=12):
    canvas = torch.randint(4, 59, (2, 24), generator=torch.Generator().manual_seed(0))
    canvas[:, masked_from:] = 3  # mask id: the rest of the generation is still to decode
    canvas[0, :2] = 0  # row 0 is left-padded
    attention = torch.ones_like(canvas)
    attention[0, :2] = 0
    return canvas, attention


@pytest.mark.parametrize("cache", ["dkv-cache", "dkv-cache(delay=2)", "elastic-cache"])
def test_a_cached_step_on_an_unchanged_canvas_gives_the_full_forward(tiny, cache):
    """Nothing changed since the refresh: the cache only reorders the work."""
    model, _ = tiny
    canvas, attention = _canvas()
    full = model(input_ids=canvas, attention_mask=attention).logits
    with dllm.accelerate(model, f"semi-ar(block_length=4) + {cache}") as acceleration:
        plan = plan_of(model)
        plan.generation, plan.block_index, plan.window = 99, 3, (12, 16)
        refreshed = model(input_ids=canvas, attention_mask=attention).logits
        cached = model(input_ids=canvas, attention_mask=attention).logits
        plan.window = None
        stats = acceleration.stats()
    assert stats["full_forwards"] == 1 and stats["cached_forwards"] == 1
    assert torch.equal(refreshed, full)
    real = attention.bool()  # padded positions' logits are meaningless either way
    torch.testing.assert_close(cached[real], full[real], rtol=1e-5, atol=1e-5)


def test_dkv_answers_an_unchanged_fully_decoded_canvas_from_the_cache_alone(tiny):
    model, _ = tiny
    canvas, attention = _canvas(masked_from=24)  # nothing masked
    full = model(input_ids=canvas, attention_mask=attention).logits
    with dllm.accelerate(model, "dkv-cache") as acceleration:
        model(input_ids=canvas, attention_mask=attention)
        cached = model(input_ids=canvas, attention_mask=attention).logits
        stats = acceleration.stats()
    assert torch.equal(cached, full)
    assert stats["cached_forwards"] == 1 and stats["compute_fraction"] == 0.5  # the refresh alone


def test_dkv_recomputes_a_token_the_step_after_it_is_committed_then_freezes_it(tiny):
    """delay=1: the committed token is recomputed on the next call with its real id (its
    logits then match a full forward's wherever nothing else changed), and not after that."""
    model, _ = tiny
    canvas, attention = _canvas()
    committed = canvas.clone()
    committed[:, 12] = 7
    with dllm.accelerate(model, "dkv-cache") as acceleration:
        model(input_ids=canvas, attention_mask=attention)
        model(input_ids=committed, attention_mask=attention)  # 12 masked + the committed one
        model(input_ids=committed, attention_mask=attention)  # the 11 masked alone
        stats = acceleration.stats()
    assert stats["compute_fraction"] == pytest.approx((24 + 12 + 11) / (3 * 24))


def test_elastic_refreshes_a_step_whose_attention_drifted_and_answers_it_exactly(tiny):
    model, _ = tiny
    canvas, attention = _canvas()
    changed = canvas.clone()
    changed[:, 12:16] = torch.randint(4, 59, (2, 4), generator=torch.Generator().manual_seed(1))  # the block decoded
    full = model(input_ids=changed, attention_mask=attention).logits

    def run(threshold):
        with dllm.accelerate(model, f"elastic-cache(threshold={threshold})") as acceleration:
            plan = plan_of(model)
            plan.generation, plan.block_index, plan.window = 99, 3, (12, 16)
            model(input_ids=canvas, attention_mask=attention)
            model(input_ids=canvas, attention_mask=attention)
            unchanged = acceleration.stats()
            logits = model(input_ids=changed, attention_mask=attention).logits
            plan.window = None
            return unchanged, acceleration.stats(), logits

    unchanged, stats, _ = run(1e-6)
    assert unchanged["last_similarity"] == pytest.approx(1.0, abs=1e-6)
    drifted = stats["last_similarity"]
    assert drifted < 1 - 1e-5  # the block's new tokens moved its attention
    unchanged, stats, logits = run(1 - (1 - drifted) / 2)  # between the two
    assert unchanged["drift_refreshes"] == 0 and unchanged["cached_forwards"] == 1
    assert stats["drift_refreshes"] == 1 and stats["full_forwards"] == 2 and stats["cached_forwards"] == 1
    assert torch.equal(logits, full)
    # the abandoned step computed the block through every layer before the refresh
    assert stats["compute_fraction"] == pytest.approx(2 * (24 + 4 + 4 + 24) / (2 * 3 * 24))


@pytest.mark.parametrize("cache", ["dkv-cache", "dkv-cache(delay=2, refresh_every=3)", "elastic-cache",
                                   "elastic-cache(threshold=0.99995, layer=0)"])
def test_remove_restores_bit_identical_outputs(tiny, cache):
    model, tokenizer = tiny
    canvas, attention = _canvas()
    before = model(input_ids=canvas, attention_mask=attention).logits
    plain = decode(model, tokenizer)
    handle = dllm.accelerate(model, f"{BLOCKS} + {cache}")
    decode(model, tokenizer)
    handle.remove()
    assert plan_of(model) is None and not model._forward_pre_hooks
    assert all(not module._forward_pre_hooks for module in model.modules())
    assert torch.equal(model(input_ids=canvas, attention_mask=attention).logits, before)
    assert torch.equal(decode(model, tokenizer).tokens, plain.tokens)


@pytest.mark.parametrize("cache, exact", [("dkv-cache(refresh_every=1)", True), ("elastic-cache(threshold=1.0)", True),
                                          ("dkv-cache", False), ("elastic-cache", False)])
def test_llada2_pipeline_is_accelerated_and_restored(tiny, cache, exact):
    from diffusers import BlockRefinementScheduler, LLaDA2Pipeline

    model, tokenizer = tiny
    pipe = LLaDA2Pipeline(model=model, scheduler=BlockRefinementScheduler(), tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    call = {"prompt": "12+34=", "use_chat_template": False, "gen_length": 16, "block_length": 4,
            "num_inference_steps": 4, "threshold": 0.95, "sampling_method": "greedy", "editing_threshold": None,
            "output_type": "seq"}
    plain = pipe(**call).sequences
    with dllm.accelerate(pipe, cache) as acceleration:
        sequences = pipe(**call).sequences
        stats = acceleration.stats()
    if exact:
        assert torch.equal(sequences, plain) and stats["cached_forwards"] == 0
    else:
        assert stats["cached_forwards"] > 0 and stats["compute_fraction"] < 1
        assert stats["full_forwards"] >= 5  # the pipeline's input grows by a block: at least one refresh each
    assert torch.equal(pipe(**call).sequences, plain)


@pytest.mark.parametrize("config, message", [
    (lambda: DkvCacheConfig(delay=0), r"dkv-cache: delay=0 must be >= 1"),
    (lambda: DkvCacheConfig(delay=1.5), r"dkv-cache: delay=1.5 must be an integer >= 1"),
    (lambda: DkvCacheConfig(delay=True), r"dkv-cache: delay=True must be a number >= 1"),
    (lambda: DkvCacheConfig(refresh_every=-1), r"dkv-cache: refresh_every=-1 must be >= 0"),
    (lambda: ElasticCacheConfig(threshold=0.0), r"elastic-cache: threshold=0.0 must be in \(0.0, 1.0\]"),
    (lambda: ElasticCacheConfig(threshold=1.5), r"elastic-cache: threshold=1.5 must be in \(0.0, 1.0\]"),
    (lambda: ElasticCacheConfig(layer=-2), r"elastic-cache: layer=-2 must be >= -1"),
    (lambda: ElasticCacheConfig(layer=0.5), r"elastic-cache: layer=0.5 must be an integer >= -1"),
])
def test_bad_knobs_are_refused_naming_the_value_and_the_valid_range(config, message):
    with pytest.raises(ValueError, match=message):
        config()


def test_a_layer_the_model_does_not_have_is_refused_and_nothing_is_installed(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match=r"layer=3 is not a layer of this 3-layer model; valid: -1 \(the deepest\) "
                                         r"or 0\.\.2"):
        dllm.accelerate(model, "elastic-cache(layer=3)")
    assert plan_of(model) is None


def test_a_recipe_holds_one_cache(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match=r"already has a KV cache, dual-cache"):
        dllm.accelerate(model, "dual-cache + dkv-cache")
    assert plan_of(model) is None


def _drifted_step(model, recipe):
    """A block refreshed, the same canvas once more (no drift), then the block's tokens changed:
    -> (the stats after, the logits of the changed canvas, the full forward's logits of it)."""
    canvas, attention = _canvas()
    changed = canvas.clone()
    changed[:, 12:16] = torch.randint(4, 59, (2, 4), generator=torch.Generator().manual_seed(1))
    full = model(input_ids=changed, attention_mask=attention).logits
    with dllm.accelerate(model, recipe) as acceleration:
        plan = plan_of(model)
        plan.generation, plan.block_index, plan.window = 99, 3, (12, 16)
        model(input_ids=canvas, attention_mask=attention)
        model(input_ids=canvas, attention_mask=attention)
        logits = model(input_ids=changed, attention_mask=attention).logits
        plan.window = None
        return acceleration.stats(), logits, full


def test_a_depth_aware_refresh_from_layer_0_is_a_full_refresh_bit_for_bit(tiny):
    """Layer 0's input is the token embeddings, which no cached step makes stale."""
    stats, logits, full = _drifted_step(tiny[0], "elastic-cache(threshold=0.999999, layer=0, depth_aware=true)")
    assert stats["drift_refreshes"] == 1 and stats["depth_refreshes"] == 1 and stats["full_forwards"] == 1
    assert torch.equal(logits, full)
    # refresh (24) + a cached step (4) + the abandoned block through layer 0 (4 / 3) + layers 0-2 over 24
    assert stats["compute_fraction"] == pytest.approx((24 + 4 + 4 / 3 + 24) / (3 * 24))


def test_a_depth_aware_refresh_recomputes_the_deep_layers_and_keeps_the_shallow_cache(tiny):
    model = tiny[0]
    canvas, attention = _canvas()
    before = model(input_ids=canvas, attention_mask=attention).logits
    stats, logits, full = _drifted_step(model, "elastic-cache(threshold=0.999999, layer=2, depth_aware=true)")
    assert stats["depth_refreshes"] == 1 and stats["full_forwards"] == 1
    # the deepest layer alone: the whole block through 3 layers abandoned, then 1 of 3 layers over 24
    assert stats["compute_fraction"] == pytest.approx((24 + 4 + 4 + 24 / 3) / (3 * 24))
    # close to the full forward (the shallow layers' keys are one step stale), and not equal to it
    assert not torch.equal(logits, full)
    assert (logits.softmax(-1) - full.softmax(-1)).abs().max() < 0.05
    # the layers below the watched one run as themselves again afterwards
    assert torch.equal(model(input_ids=canvas, attention_mask=attention).logits, before)
    assert all("forward" not in vars(layer) for layer in model.model.layers)


def test_depth_aware_must_be_a_boolean():
    with pytest.raises(ValueError, match="depth_aware='yes' must be true or false"):
        ElasticCacheConfig(depth_aware="yes")
