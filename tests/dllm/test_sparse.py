"""prompt-sparse: canvas queries read only the prompt's selected key blocks (cadence.dllm.sparse)."""

import math

import pytest
import torch

from cadence import dllm
from cadence.dllm.plan import plan_of
from cadence.dllm.sparse import STATE, PromptSparseConfig, select_prompt_blocks

# different lengths: the batch is left-padded; the first is long enough for several blocks of 4
PROMPTS = ["k1=ab;k2=cd;k3=ef;k4=gh;k5=ij;k6=kl;k7=mn;k2?", "12+34="]
FAST = "semi-ar(block_length=4) + parallel(threshold=0.03)"


def decode(model, tokenizer, recipe, gen_length=16):
    with dllm.accelerate(model, recipe) as acceleration:
        return dllm.generate(model, tokenizer, PROMPTS, gen_length), acceleration.stats()


def canvas_and_padding(prompt=40, generation=16, batch=2, padded=7):
    """Random token ids (B, prompt + generation) and a mask whose second row is left-padded."""
    ids = torch.randint(4, 59, (batch, prompt + generation), generator=torch.Generator().manual_seed(1))
    attention = torch.ones_like(ids)
    attention[1, :padded] = 0
    return ids, attention


def in_block(model, block_index, low, high):
    """Put the model's plan where the engine would be while decoding [low, high)."""
    plan = plan_of(model)
    plan.generation, plan.block_index, plan.window = 7, block_index, (low, high)
    return plan


@pytest.mark.parametrize("queries", ["canvas", "all"])
def test_density_one_is_the_dense_model_bit_for_bit(tiny, queries):
    model, tokenizer = tiny
    dense = decode(model, tokenizer, FAST)[0]
    sparse, stats = decode(model, tokenizer, f"{FAST} + prompt-sparse(density=1.0, block=4, queries={queries})")
    assert torch.equal(sparse.tokens, dense.tokens)
    assert stats["prompt_density"] == 1.0 and stats["keys_read"] == 1.0
    ids, attention = canvas_and_padding()
    position_ids = (attention.cumsum(-1) - 1).clamp_min(0)
    full = model(input_ids=ids, attention_mask=attention, position_ids=position_ids).logits
    with dllm.accelerate(model, f"semi-ar(block_length=4) + prompt-sparse(density=1.0, block=4, queries={queries})"):
        in_block(model, 1, 44, 48)  # the prompt is 40 tokens
        kept = model(input_ids=ids, attention_mask=attention, position_ids=position_ids).logits
        plan_of(model).window = None
    assert torch.equal(kept, full)


class Poison:
    """A KV cache object that writes NaN into the keys and values of every prompt position the
    layer's selection left out (at ``layers``); the attention reads what it returns."""

    def __init__(self, model, prompt, layers):
        self.state = getattr(model.model.layers[0].self_attn, STATE)
        self.prompt, self.layers, self.poisoned = prompt, layers, 0

    def update(self, key, value, layer_idx, *args, **kwargs):  # (B, kv heads, tokens, head dim)
        if layer_idx not in self.layers:
            return key, value
        read = torch.zeros(key.shape[:3], dtype=torch.bool)
        read.scatter_(2, self.state.selected[layer_idx], True)
        read[:, :, self.prompt :] = True
        self.poisoned += int((~read).sum())
        return key.masked_fill(~read[..., None], math.nan), value.masked_fill(~read[..., None], math.nan)


@pytest.mark.parametrize("queries", ["canvas", "all"])
def test_queries_never_read_an_unselected_prompt_block(tiny, queries):
    """NaN in every unselected block's keys and values changes nothing the sparse queries compute:
    with queries=all the whole forward, with queries=canvas the canvas's rows (poisoned at the last
    layer, since the prompt's own rows read every block and would carry the NaN upward)."""
    model, _ = tiny
    ids, attention = canvas_and_padding()
    layers = range(3) if queries == "all" else [2]
    with dllm.accelerate(model, f"semi-ar(block_length=4) + prompt-sparse(density=0.3, block=4, queries={queries})"):
        in_block(model, 1, 44, 48)
        clean = model(input_ids=ids, attention_mask=attention).logits  # makes the block's selection
        poison = Poison(model, 40, layers)
        poisoned = model(input_ids=ids, attention_mask=attention, cache=poison).logits
        plan_of(model).window = None
    assert poison.poisoned > 0
    rows = slice(None) if queries == "all" else slice(40, None)
    assert torch.equal(poisoned[:, rows], clean[:, rows])
    if queries == "canvas":  # the poison was there to read: the prompt's dense rows did read it
        assert poisoned[:, :40].isnan().any()


@pytest.mark.parametrize(
    "prompt, block, density, sink, window",
    [
        (40, 4, 0.25, 1, 1),
        (40, 4, 0.3, 1, 1),
        (41, 4, 0.5, 2, 0),
        (37, 8, 0.01, 1, 1),
        (12, 4, 0.1, 2, 2),
        (64, 16, 1.0, 0, 0),
    ],
)
def test_the_kept_share_is_the_density_rounded_up_to_a_block(prompt, block, density, sink, window):
    generator = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 4, 8, 16, generator=generator), torch.randn(2, 2, prompt + 8, 16, generator=generator)
    valid = torch.ones(2, prompt, dtype=torch.bool)
    valid[1, :5] = False  # the second row is left-padded
    config = PromptSparseConfig(density=density, block=block, sink=sink, window=window)
    positions = select_prompt_blocks(query, key, valid, prompt, config, 0.25)  # (B, kv heads, tokens)
    blocks = -(-prompt // block)
    short = prompt % block != 0
    kept = min(blocks, max(math.ceil(density * blocks), sink + max(window, int(short))))
    for row in positions.flatten(0, 1):
        assert torch.equal(row, row.unique()) and int(row.max()) < prompt  # ascending, no repeat, inside the prompt
        chosen = set((row // block).tolist())
        assert len(chosen) == kept
        assert set(range(blocks - max(window, int(short)), blocks)) <= chosen  # the window (and a short last block)
    assert set(range(sink)) <= set((positions[0, 0] // block).tolist())  # the first row's sinks: its first blocks
    first_real = 5 // block  # the padded row's sinks start at its first block holding a real token
    assert set(range(first_real, first_real + sink)) <= set((positions[1, 0] // block).tolist())


def test_the_block_the_queries_point_at_is_kept(tiny):
    """The estimate is the pooled scores': a prompt block whose keys align with the queries is chosen."""
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 2, 4, 16, generator=generator)
    key = torch.randn(1, 2, 40, 16, generator=generator) * 0.1
    key[:, :, 20:24] = query.mean(2, keepdim=True) * 4  # block 5 of 10
    config = PromptSparseConfig(density=0.3, block=4, sink=1, window=1)
    positions = select_prompt_blocks(query, key, torch.ones(1, 32, dtype=torch.bool), 32, config, 0.25)
    for row in positions.flatten(0, 1):
        assert set((row // 4).tolist()) == {0, 5, 7}  # sink, the aligned block, window


def test_the_selection_is_made_once_per_block_and_layer_and_keeps_the_density(tiny):
    model, tokenizer = tiny
    _, stats = decode(model, tokenizer, f"{FAST} + prompt-sparse(density=0.25, block=4)")
    assert stats["selections"] == 3 * 4  # three layers, four blocks of 4 in 16 tokens
    prompt = len(PROMPTS[0]) + 1  # with [BOS]: 46 tokens, 12 blocks of 4 (the last short)
    blocks = -(-prompt // 4)
    assert stats["prompt_density"] == math.ceil(0.25 * blocks) / blocks
    assert stats["keys_read"] < 1.0


@pytest.mark.parametrize("cache", ["prefix-cache", "dual-cache"])
@pytest.mark.parametrize("queries", ["canvas", "all"])
def test_a_cache_refreshing_every_step_is_the_sparse_term_uncached_bit_for_bit(tiny, cache, queries):
    model, tokenizer = tiny
    sparse = f"prompt-sparse(density=0.25, block=4, queries={queries})"
    uncached = decode(model, tokenizer, f"{FAST} + {sparse}")[0]
    cached, stats = decode(model, tokenizer, f"{FAST} + {cache}(refresh_every=1) + {sparse}")
    assert torch.equal(cached.tokens, uncached.tokens)
    assert stats["full_forwards"] == cached.forwards and stats["prompt_density"] == 0.25
    _, stats = decode(model, tokenizer, f"{FAST} + {cache} + {sparse}")  # cached steps read the block's selection
    assert stats["cached_forwards"] > 0 and stats["selections"] == 3 * 4


def test_remove_restores_bit_identical_outputs(tiny):
    model, _ = tiny
    ids, attention = canvas_and_padding()
    before = model(input_ids=ids, attention_mask=attention).logits
    implementation = model.config._attn_implementation
    with dllm.accelerate(model, "semi-ar(block_length=4) + prompt-sparse(density=0.25, block=4)"):
        assert model.config._attn_implementation != implementation
        in_block(model, 1, 44, 48)
        sparse = model(input_ids=ids, attention_mask=attention).logits
        plan_of(model).window = None
        assert torch.equal(model(input_ids=ids, attention_mask=attention).logits, before)  # outside the engine: dense
    assert not torch.equal(sparse, before)
    assert model.config._attn_implementation == implementation and plan_of(model) is None
    assert not any(hasattr(module, STATE) for module in model.modules())
    assert torch.equal(model(input_ids=ids, attention_mask=attention).logits, before)


@pytest.mark.parametrize(
    "knob, message",
    [
        ("density=0", r"prompt-sparse: density=0.0 must be in \(0.0, 1.0\]"),
        ("density=1.5", r"prompt-sparse: density=1.5 must be in \(0.0, 1.0\]"),
        ("block=0", r"prompt-sparse: block=0 must be >= 1"),
        ("sink=-1", r"prompt-sparse: sink=-1 must be >= 0"),
        ("window=-2", r"prompt-sparse: window=-2 must be >= 0"),
        ("queries=prompt", r"prompt-sparse: queries='prompt'; valid: canvas, all"),
    ],
)
def test_bad_knobs_are_refused_naming_the_value_and_the_valid_range(tiny, knob, message):
    with pytest.raises(ValueError, match=message):
        dllm.accelerate(tiny[0], f"prompt-sparse({knob})")


@pytest.mark.parametrize("cache", ["dllm-cache", "spa-cache", "dkv-cache", "elastic-cache"])
@pytest.mark.parametrize("sparse_first", [True, False])
def test_caches_whose_keys_outlive_a_block_are_refused_saying_why(tiny, cache, sparse_first):
    model, _ = tiny
    terms = ["prompt-sparse", cache] if sparse_first else [cache, "prompt-sparse"]
    with pytest.raises(
        ValueError, match=f"cannot compose with {cache}.*earlier block's prompt selection.*prefix-cache or dual-cache"
    ):
        dllm.accelerate(model, " + ".join(terms))
    assert plan_of(model) is None and not any(hasattr(module, STATE) for module in model.modules())


def test_a_backend_whose_mask_cannot_be_gathered_is_refused(tiny):
    model, _ = tiny
    model.config._attn_implementation = "flex_attention"
    try:
        with pytest.raises(ValueError, match=r"attention_implementation='flex_attention'.*one of: sdpa, eager"):
            dllm.accelerate(model, "prompt-sparse")
    finally:
        model.config._attn_implementation = "sdpa"


def test_the_eager_backend_is_sparse_too(tiny):
    model, tokenizer = tiny
    model.config._attn_implementation = "eager"
    try:
        dense = decode(model, tokenizer, FAST)[0]
        same = decode(model, tokenizer, f"{FAST} + prompt-sparse(density=1.0, block=4)")[0]
        _, stats = decode(model, tokenizer, f"{FAST} + prompt-sparse(density=0.25, block=4)")
        assert model.config._attn_implementation == "eager"
    finally:
        model.config._attn_implementation = "sdpa"
    assert torch.equal(same.tokens, dense.tokens) and stats["prompt_density"] == 0.25


def test_diffusion_gemma_is_refused_saying_why():
    from cadence.dllm.gemma import build_diffusion_gemma

    torch.manual_seed(0)
    with pytest.raises(
        ValueError,
        match=r"cannot apply to DiffusionGemmaForBlockDiffusion: its decoder reads the "
        r"prompt from its encoder's KV cache",
    ):
        dllm.accelerate(build_diffusion_gemma("tiny").eval(), "prompt-sparse")


def test_grouped_keys_are_selected_per_key_head_and_never_read_unselected():
    """With grouped-query attention (4 query heads on 2 key heads) each key head keeps its own
    blocks, the query heads of its group read them, and density 1 is still the dense model."""
    from cadence.models.llada import build_llada

    torch.manual_seed(0)
    model = build_llada("tiny", num_attention_heads=4, num_key_value_heads=2).eval()
    ids, attention = canvas_and_padding()
    full = model(input_ids=ids, attention_mask=attention).logits
    for density in (1.0, 0.3):
        with dllm.accelerate(
            model, f"semi-ar(block_length=4) + prompt-sparse(density={density}, block=4, queries=all)"
        ):
            in_block(model, 1, 44, 48)
            clean = model(input_ids=ids, attention_mask=attention).logits
            poison = Poison(model, 40, range(3))
            poisoned = model(input_ids=ids, attention_mask=attention, cache=poison).logits
            selected = getattr(model.model.layers[0].self_attn, STATE).selected[0]
            plan_of(model).window = None
        assert selected.shape[1] == 2 and torch.equal(poisoned, clean)
        assert torch.equal(clean, full) if density == 1.0 else poison.poisoned > 0
