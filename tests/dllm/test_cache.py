import pytest
import torch

from cadence import dllm
from cadence.dllm.plan import plan_of

PROMPTS = ["12+34=", "copy:abc="]


def decode(model, tokenizer, recipe=None, gen_length=16):
    if recipe is None:
        return dllm.generate(model, tokenizer, PROMPTS, gen_length)
    with dllm.accelerate(model, recipe) as acceleration:
        return dllm.generate(model, tokenizer, PROMPTS, gen_length), acceleration.stats()


@pytest.mark.parametrize("cache", ["prefix-cache", "dual-cache"])
def test_refreshing_every_step_is_the_uncached_model_bit_for_bit(tiny, cache):
    plain = decode(*tiny, "semi-ar(block_length=4) + parallel(threshold=0.03)")[0]
    cached, stats = decode(*tiny, f"semi-ar(block_length=4) + parallel(threshold=0.03) + {cache}(refresh_every=1)")
    assert torch.equal(cached.tokens, plain.tokens)
    assert stats["cached_forwards"] == 0 and stats["full_forwards"] == cached.forwards


@pytest.mark.parametrize("cache, computed", [("prefix-cache", (16 + 12 + 8 + 4) / 16 / 4),
                                             ("dual-cache", 4 / 16)])
def test_cached_steps_compute_only_the_active_tokens(tiny, cache, computed):
    _, stats = decode(*tiny, f"semi-ar(block_length=4) + {cache}")
    assert stats["full_forwards"] == 4 and stats["cached_forwards"] == 12  # one refresh a block
    prompt = 10  # the longest prompt with [BOS]: "copy:abc=" is 9 characters
    width = prompt + 16
    refresh, cached = 4 * width, sum(3 * ((16 - 4 * block) if cache == "prefix-cache" else 4) for block in range(4))
    assert stats["compute_fraction"] == pytest.approx((refresh + cached) / (16 * width))
    assert computed  # the fractions above, in words: the block (and, for prefix, everything after it)


@pytest.mark.parametrize("cache", ["prefix-cache", "dual-cache"])
def test_a_cached_step_on_an_unchanged_canvas_gives_the_full_forward(tiny, cache):
    """The splice is exact when nothing changed since the refresh: it only reorders work."""
    model, _ = tiny
    canvas = torch.randint(4, 59, (2, 24), generator=torch.Generator().manual_seed(0))
    full = model(input_ids=canvas).logits
    with dllm.accelerate(model, f"semi-ar(block_length=4) + {cache}"):
        plan = plan_of(model)
        plan.generation, plan.block_index, plan.window = 99, 1, (12, 16)
        refreshed = model(input_ids=canvas).logits
        cached = model(input_ids=canvas).logits
        plan.window = None
    assert torch.equal(refreshed, full)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_llada2_pipeline_is_accelerated_and_restored(tiny):
    from diffusers import BlockRefinementScheduler, LLaDA2Pipeline

    model, tokenizer = tiny
    pipe = LLaDA2Pipeline(model=model, scheduler=BlockRefinementScheduler(), tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="12+34=", use_chat_template=False, gen_length=16, block_length=4, num_inference_steps=4,
                threshold=0.95, sampling_method="greedy", editing_threshold=None, output_type="seq")
    plain = pipe(**call).sequences
    with dllm.accelerate(pipe, "prefix-cache(refresh_every=1)"):
        assert torch.equal(pipe(**call).sequences, plain)
    with dllm.accelerate(pipe, "prefix-cache") as acceleration:
        pipe(**call)
        stats = acceleration.stats()
    assert stats["cached_forwards"] > 0 and stats["full_forwards"] == 5  # one refresh per block it decodes
    assert torch.equal(pipe(**call).sequences, plain)
    with pytest.raises(ValueError, match=r"LLaDA2Pipeline decodes with its own scheduler, so parallel\(threshold=0.8\)"):
        dllm.accelerate(pipe, "parallel(threshold=0.8) + prefix-cache")


def test_a_model_of_another_family_is_refused():
    with pytest.raises(ValueError, match=r"no cadence dLLM adapter for Linear; supported: "
                                         r"DiffusionGemmaForBlockDiffusion, EuroBertForMaskedLM"):
        dllm.accelerate(torch.nn.Linear(2, 2), "dual-cache")


def test_the_cache_goes_by_the_keyword_the_installed_transformers_takes():
    """transformers 5.2x takes ``cache``, 5.17 (the GPU image) ``past_key_values``: the caches pass
    it by the name the forward declares, and a call that brings its own cache under either name
    is left to the model."""
    from cadence.dllm.cache import cache_keyword, has_no_cache

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, **kwargs): ...

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None, **kwargs): ...

    class Head(torch.nn.Module):  # a head model taking it through **kwargs: its inner model decides
        def __init__(self):
            super().__init__()
            self.model = New()

        def forward(self, input_ids, **kwargs): ...

    held = object()
    assert cache_keyword(Old()) == "past_key_values" and cache_keyword(New()) == "cache"
    assert cache_keyword(Head()) == "cache"
    assert has_no_cache({"attention_mask": None})
    assert not has_no_cache({"past_key_values": held}) and not has_no_cache({"cache": held})
