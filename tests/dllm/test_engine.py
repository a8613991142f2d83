import pytest
import torch

from cadence import dllm
from cadence.accel.registry import get_technique
from cadence.dllm.plan import PLAN
from cadence.dllm.policies import _top
from cadence.dllm.tokenizer import build_tokenizer
from cadence.recipe import Recipe

PROMPTS = ["12+34=", "copy:abc="]  # different lengths: the batch is left-padded
TERMS = ["low-confidence", "random-remask", "parallel", "entropy-bounded", "semi-ar", "eos-stop", "token-editing",
         "prefix-cache", "dual-cache"]


def decode(model, tokenizer, recipe=None, gen_length=16, prompts=PROMPTS):
    if recipe is None:
        return dllm.generate(model, tokenizer, prompts, gen_length)
    with dllm.accelerate(model, recipe):
        return dllm.generate(model, tokenizer, prompts, gen_length)


def test_plain_decoding_commits_one_token_per_step(tiny):
    result = decode(*tiny)
    assert result.forwards == 16 and result.tokens.shape == (2, 16)
    assert (result.tokens != tiny[1].mask_token_id).all()


@pytest.mark.parametrize("recipe", ["parallel(threshold=1.0)", "low-confidence(tokens_per_step=1)"])
def test_policies_at_their_plain_setting_equal_plain_decoding(tiny, recipe):
    assert torch.equal(decode(*tiny, recipe).tokens, decode(*tiny).tokens)


def test_remove_restores_bit_identical_outputs(tiny):
    model, tokenizer = tiny
    before = decode(model, tokenizer)
    logits = model(input_ids=torch.arange(5, 25)[None]).logits
    for recipe in ["semi-ar(block_length=4) + parallel(threshold=0.02) + dual-cache + eos-stop",
                   "semi-ar(block_length=8) + entropy-bounded(bound=9.0) + prefix-cache",
                   "random-remask(tokens_per_step=3)"]:
        acceleration = dllm.accelerate(model, recipe)
        assert not torch.equal(dllm.generate(model, tokenizer, PROMPTS, 16).tokens, before.tokens)
        acceleration.remove()
        assert not hasattr(model, PLAN) and getattr(model, "_diffusers_hook", None) is None or \
            model._diffusers_hook.get_hook("cadence.dllm.kv-cache") is None
        assert torch.equal(decode(model, tokenizer).tokens, before.tokens)
        assert torch.equal(model(input_ids=torch.arange(5, 25)[None]).logits, logits)


def test_parallel_commits_everything_above_the_threshold_and_at_least_one():
    config = get_technique("parallel").config(threshold=0.5)
    logits = torch.tensor([[[5.0, 0, 0], [0.1, 0, 0], [4.0, 0, 0]], [[0.1, 0, 0], [0.2, 0, 0], [0, 0, 0.3]]])
    masked = torch.tensor([[True, True, False], [True, True, True]])
    chosen = config.commit(logits, masked)
    assert chosen.tolist() == [[True, False, False], [False, False, True]]


def test_entropy_bounded_stays_within_its_bound():
    config = get_technique("entropy-bounded").config(bound=0.3)
    logits = torch.randn(4, 12, 9, generator=torch.Generator().manual_seed(0)) * 6
    masked = torch.rand(4, 12, generator=torch.Generator().manual_seed(1)) < 0.7
    chosen = config.commit(logits, masked)
    entropy = torch.special.entr(torch.softmax(logits, -1)).sum(-1)
    assert (chosen <= masked).all() and (chosen.sum(-1) >= 1).all()
    for row in range(4):
        if chosen[row].sum() > 1:
            assert entropy[row][chosen[row]].sum() <= 0.3 + 1e-6


def test_top_counts_are_clamped_to_the_masked_positions():
    chosen = _top(torch.tensor([[0.1, 0.9, 0.5]]), torch.tensor([[True, False, True]]), torch.tensor([5]))
    assert chosen.tolist() == [[True, False, True]]


def test_semi_ar_decodes_blocks_left_to_right(tiny):
    model, tokenizer = tiny
    with dllm.accelerate(model, "semi-ar(block_length=4) + low-confidence(tokens_per_step=4)"):
        canvases = [canvas[:, start:].clone() for canvas, start in dllm.decode_steps(model, tokenizer, PROMPTS, 16)]
    assert len(canvases) == 4
    for block, canvas in enumerate(canvases):
        decided = canvas != tokenizer.mask_token_id
        assert decided[:, :4 * (block + 1)].all() and not decided[:, 4 * (block + 1):].any()


def test_eos_stop_fills_the_tail_once_the_answer_is_decided(tiny):
    from cadence.dllm.engine import _finished

    canvas = torch.tensor([[9, 7, 2, 3, 3], [9, 3, 2, 3, 3], [9, 7, 8, 3, 3]])
    assert _finished(canvas, 1, mask_id=3, eos_id=2).tolist() == [True, False, False]


def test_every_term_round_trips_through_a_recipe_string_and_toml():
    for name in TERMS:
        recipe = Recipe([get_technique(name).config()])
        assert Recipe.parse(str(recipe)) == recipe and Recipe.from_toml(recipe.to_toml()) == recipe
        assert all(help_text for *_, help_text in get_technique(name).config.describe())


# -- refused before decoding ---------------------------------------------------------------

def test_a_prompt_longer_than_the_context_is_refused(tiny):
    with pytest.raises(ValueError, match=r"prompt of 7 tokens plus gen_length=510 is 517 tokens, longer than the "
                                         r"model's context of 512; .* gen_length <= 505"):
        dllm.generate(*tiny, ["12+34="], 510)


def test_a_block_length_that_does_not_divide_the_generation_is_refused(tiny):
    with dllm.accelerate(tiny[0], "semi-ar(block_length=8)"):
        with pytest.raises(ValueError, match=r"block_length=8 does not divide gen_length=20; use gen_length 16 or 24"):
            dllm.generate(*tiny, PROMPTS, 20)


@pytest.mark.parametrize("threshold", ["0", "1.5", "-0.1", "nan"])
def test_a_threshold_outside_zero_one_is_refused(threshold):
    with pytest.raises(ValueError, match=r"parallel: threshold=.* must be in \(0.0, 1.0\]"):
        Recipe.parse(f"parallel(threshold={threshold})")


def test_a_tokenizer_that_does_not_match_the_model_is_refused(tiny):
    model, _ = tiny
    other = build_tokenizer()
    other.add_tokens(["#"])
    with pytest.raises(ValueError, match=r"tokenizer does not match the model: vocabulary size 60 \(the model's: 59\)"):
        dllm.generate(model, other, PROMPTS, 8)


def test_two_decoding_policies_are_refused(tiny):
    with pytest.raises(ValueError, match=r"already has a decoding policy, parallel; a dLLM recipe holds one"):
        dllm.accelerate(tiny[0], "parallel + low-confidence(tokens_per_step=2)")
    assert not hasattr(tiny[0], PLAN)


def test_token_editing_that_never_fires_only_checks_once_per_block(tiny):
    model, tokenizer = tiny
    plain = decode(model, tokenizer, "semi-ar(block_length=4)")
    checked = decode(model, tokenizer, "semi-ar(block_length=4) + token-editing(threshold=1.0)")
    assert torch.equal(checked.tokens, plain.tokens) and checked.forwards == plain.forwards + 4


def test_token_editing_replaces_what_the_model_now_prefers():
    config = get_technique("token-editing").config(threshold=0.6)
    logits = torch.tensor([[[0.0, 9.0], [9.0, 0.0], [0.0, 0.1]]])
    assert config.edit(logits, torch.tensor([[0, 0, 0]])).tolist() == [[True, False, False]]
