"""cadence.dllm on transformers' DiffusionGemma: its canvas, its exact prefix cache, its refusals, its peer."""

import json

import pytest
import torch
from click.testing import CliRunner

from cadence import dllm
from cadence.dllm.bench import bench, write_report
from cadence.dllm.gemma import STATE, build_diffusion_gemma, decode_with_generate
from cadence.dllm.plan import PLAN
from cadence.dllm.tokenizer import build_tokenizer

PROMPTS = ["12+34=", "copy:abc="]  # different lengths: the batch is left-padded
FAST = "semi-ar(block_length=8) + parallel(threshold=0.9) + dual-cache"


@pytest.fixture(scope="module")
def gemma():
    """A seeded random DiffusionGemma (canvases of 8) and ref-dllm's character tokenizer; one
    thread, since the machine's cores are shared (four times faster than contending for them)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield build_diffusion_gemma("tiny").eval(), build_tokenizer()
    torch.set_num_threads(threads)


def decode(model, tokenizer, recipe=None, gen_length=16, prompts=PROMPTS):
    if recipe is None:
        return dllm.generate(model, tokenizer, prompts, gen_length), None
    with dllm.accelerate(model, recipe) as acceleration:
        return dllm.generate(model, tokenizer, prompts, gen_length), acceleration.stats()


def test_the_fast_recipe_decodes_a_diffusion_gemma(gemma):
    model, tokenizer = gemma
    encodings = []
    handle = model.model.encoder.register_forward_hook(lambda *_: encodings.append(1))
    try:
        plain, _ = decode(model, tokenizer)
        assert len(encodings) == plain.forwards == 16  # uncached: the prefix is encoded at every step
        encodings.clear()
        result, stats = decode(model, tokenizer, FAST)
    finally:
        handle.remove()
    assert result.tokens.shape == (2, 16) and (result.tokens != tokenizer.mask_token_id).all()
    assert len(encodings) == stats["full_forwards"] == 2  # once a canvas
    assert stats["cached_forwards"] == result.forwards - 2


@pytest.mark.parametrize("cache", ["prefix-cache", "dual-cache"])
@pytest.mark.parametrize("refresh_every", [0, 1, 2])
def test_the_prefix_cache_is_the_uncached_model_bit_for_bit_at_every_refresh(gemma, cache, refresh_every):
    """The encoder is causal and the prefix does not change inside a canvas: keeping its
    encoding is exact, however rarely it is refreshed."""
    policy = "low-confidence(tokens_per_step=3)"
    plain, _ = decode(*gemma, policy)
    cached, stats = decode(*gemma, f"{policy} + {cache}(refresh_every={refresh_every})")
    assert torch.equal(cached.tokens, plain.tokens) and cached.forwards == plain.forwards == 2 * 3
    encodings = {0: 2, 1: 6, 2: 4}[refresh_every]  # per canvas of 3 steps: once; every step; steps 1 and 3
    assert stats["full_forwards"] == encodings and stats["forwards"] == cached.forwards
    if refresh_every == 0:
        prompt = 10  # "copy:abc=" with [BOS]; the canvases' encoder reads 10, then 18 tokens
        uncached = 3 * (prompt + 8) + 3 * (prompt + 16)
        computed = (prompt + 8) + 2 * 8 + (prompt + 16) + 2 * 8
        assert stats["compute_fraction"] == pytest.approx(computed / uncached)


def test_remove_restores_bit_identical_outputs(gemma):
    model, tokenizer = gemma
    before, _ = decode(model, tokenizer)
    ids = torch.arange(5, 15)[None]
    canvas = torch.arange(20, 28)[None]
    logits = model(input_ids=ids, decoder_input_ids=canvas).logits
    for recipe in [
        FAST + " + eos-stop",
        "entropy-bounded(bound=9.0) + prefix-cache(refresh_every=2)",
        "low-confidence(tokens_per_step=8) + token-editing(threshold=0.01)",
    ]:
        acceleration = dllm.accelerate(model, recipe)
        decode(model, tokenizer)
        acceleration.remove()
        assert not hasattr(model, PLAN) and not hasattr(model, STATE)
        assert torch.equal(decode(model, tokenizer)[0].tokens, before.tokens)
        assert torch.equal(model(input_ids=ids, decoder_input_ids=canvas).logits, logits)


def test_the_canvas_is_the_block_and_nothing_after_it_is_read(gemma):
    """Block-causal: the first canvas decodes the same whether or not more canvases follow."""
    model, tokenizer = gemma
    short, _ = decode(model, tokenizer, gen_length=8)
    long, _ = decode(model, tokenizer, gen_length=24)
    assert short.forwards == 8 and long.forwards == 24  # plain decoding: one token a step
    assert torch.equal(long.tokens[:, :8], short.tokens)


def test_left_padding_is_invisible(gemma):
    """The second row decodes the same beside a short or a long first prompt: the encoder and the
    decoder read its padding through the attention mask, and its positions start at its own
    first token (the noise a row sees depends only on the batch shape and the seed)."""
    model, tokenizer = gemma
    for recipe in (None, "low-confidence(tokens_per_step=3) + prefix-cache"):
        beside_short, _ = decode(model, tokenizer, recipe, prompts=["copy:abc=", "12+34="])
        beside_long, _ = decode(model, tokenizer, recipe, prompts=["copy:abcdefgh=", "12+34="])
        assert torch.equal(beside_short.tokens[1], beside_long.tokens[1])


def test_policies_decide_how_many_tokens_a_step_commits(gemma):
    model, tokenizer = gemma
    plain, _ = decode(model, tokenizer)
    whole = decode(model, tokenizer, "low-confidence(tokens_per_step=8)")[0]
    assert whole.forwards == 2 and not torch.equal(whole.tokens, plain.tokens)  # a canvas a step
    assert torch.equal(decode(model, tokenizer, "parallel(threshold=1.0)")[0].tokens, plain.tokens)


# -- refused before decoding ---------------------------------------------------------------


def test_a_block_other_than_the_canvas_is_refused(gemma):
    with pytest.raises(
        ValueError,
        match=r"semi-ar\(block_length=4\): DiffusionGemmaForBlockDiffusion denoises "
        r"canvases of canvas_length=8 tokens, its block; use semi-ar\(block_length=8\)",
    ):
        dllm.accelerate(gemma[0], "semi-ar(block_length=4) + parallel")
    assert not hasattr(gemma[0], PLAN)
    with pytest.raises(
        ValueError,
        match=r"DiffusionGemmaForBlockDiffusion: block_length=8 does not divide "
        r"gen_length=12; use gen_length 8 or 16$",
    ):
        dllm.generate(*gemma, PROMPTS, 12)


@pytest.mark.parametrize(
    "cache, why",
    [
        ("dkv-cache", "already in the encoder's exact cache"),
        ("elastic-cache", "never goes stale inside a block"),
        ("dllm-cache", "sandwich norms and a mixture of experts"),
        ("spa-cache", "sandwich norms and a mixture of experts"),
    ],
)
def test_caches_that_cannot_apply_are_refused_saying_why(gemma, cache, why):
    model, _ = gemma
    with pytest.raises(
        ValueError,
        match=rf"{cache}.*: not applicable to DiffusionGemmaForBlockDiffusion: .*{why}.*"
        r"valid caches here: prefix-cache, dual-cache",
    ):
        dllm.accelerate(model, f"parallel + {cache}")
    assert not hasattr(model, PLAN) and not hasattr(model, STATE)


def test_a_tokenizer_that_does_not_match_is_refused(gemma):
    other = build_tokenizer()
    other.add_tokens(["#"])
    with pytest.raises(ValueError, match=r"tokenizer does not match the model: vocabulary size 60 \(the model's: 59\)"):
        dllm.generate(gemma[0], other, PROMPTS, 8)


def test_a_tokenizer_ending_on_one_of_the_models_end_tokens_matches():
    """Gemma configs list several end-of-sequence ids; the tokenizer's must be one of them."""
    from cadence.dllm.gemma import GEMMA
    from cadence.dllm.tokenizer import check_tokenizer

    text = GEMMA.configs["tiny"]["text_config"]
    check_tokenizer(build_diffusion_gemma(text_config={**text, "eos_token_id": [5, 2]}), build_tokenizer())
    with pytest.raises(ValueError, match=r"eos_token_id 2 \(the model's: \[5, 6\]\)"):
        check_tokenizer(build_diffusion_gemma(text_config={**text, "eos_token_id": [5, 6]}), build_tokenizer())


# -- the peer: DiffusionGemma's own generate ----------------------------------------------


def test_the_peer_is_seeded_and_leaves_the_random_state_alone(gemma):
    state = torch.random.get_rng_state()
    first = decode_with_generate(*gemma, PROMPTS, 16, {"max_denoising_steps": 4})
    second = decode_with_generate(*gemma, PROMPTS, 16, {"max_denoising_steps": 4})
    assert torch.equal(first[0], second[0]) and first[0].shape == (2, 16)
    assert 1 <= first[1] <= 2 * 4  # decoder forwards: at most 4 steps for each of the two canvases
    assert torch.equal(torch.random.get_rng_state(), state)


def test_bench_runs_cadence_and_the_peer_and_writes_the_table(gemma, tmp_path):
    model, tokenizer = gemma
    peers = ["peer:diffusion-gemma()", "peer:diffusion-gemma(entropy_bound=1.0, max_denoising_steps=16)"]
    rows = bench(
        model,
        tokenizer,
        [FAST, *peers],
        tasks=["copy"],
        prompts_per_task=2,
        gen_length=16,
        batch_size=2,
        warmup=False,
        reference="semi-ar(block_length=8)",
        log=lambda *_: None,
    )
    assert [row.recipe for row in rows] == ["semi-ar(block_length=8)", FAST, *peers]
    assert rows[0].forwards_per_generation == 16
    assert 2 <= rows[2].forwards_per_generation <= 2 * 48 and 2 <= rows[3].forwards_per_generation <= 2 * 16
    write_report(rows, tmp_path, {"device": "CPU"})
    table = (tmp_path / "table.md").read_text()
    assert all(f"| `{recipe}` |" in table for recipe in [FAST, *peers])
    assert len(json.loads((tmp_path / "rows.json").read_text())["rows"]) == 4


def test_a_peer_of_the_other_family_or_a_bad_setting_is_refused(gemma, tiny):
    kwargs = {"tasks": ["copy"], "prompts_per_task": 1, "gen_length": 8, "warmup": False, "log": lambda *_: None}
    with pytest.raises(
        ValueError,
        match=r"peer:llada2\(threshold=0.9\) does not decode a DiffusionGemmaForBlockDiffusion; "
        r"its peer is peer:diffusion-gemma",
    ):
        bench(*gemma, ["peer:llada2(threshold=0.9)"], **kwargs)
    with pytest.raises(ValueError, match=r"does not decode a EuroBertForMaskedLM; its peer is peer:llada2"):
        bench(*tiny, ["peer:diffusion-gemma()"], **kwargs)
    with pytest.raises(ValueError, match=r"unknown setting 'steps'; valid: entropy_bound, max_denoising_steps"):
        bench(*gemma, ["peer:diffusion-gemma(steps=4)"], **kwargs)
    with pytest.raises(ValueError, match=r"entropy_bound=-1 must be positive"):
        bench(*gemma, ["peer:diffusion-gemma(entropy_bound=-1)"], **kwargs)


def test_the_cli_loads_a_diffusion_gemma_checkpoint_and_benches_it_with_its_peer(gemma, tmp_path):
    from cadence.dllm.cli import dllm as dllm_cli

    model, tokenizer = gemma
    checkpoint = tmp_path / "tiny-gemma"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    runner = CliRunner()
    result = runner.invoke(
        dllm_cli,
        ["generate", "--model", str(checkpoint), "--prompt", "12+34=", "--gen-length", "16", "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    assert "forwards for 16 tokens; recipe: parallel + prefix-cache" in result.output
    out = tmp_path / "bench"
    result = runner.invoke(
        dllm_cli,
        [
            "bench",
            "--model",
            str(checkpoint),
            "--recipe",
            FAST,
            "--tasks",
            "copy",
            "--prompts",
            "1",
            "--gen-length",
            "16",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    table = (out / "table.md").read_text()
    assert "| `semi-ar(block_length=8)` |" in table and f"| `{FAST}` |" in table
    assert "| `peer:diffusion-gemma()` |" in table
    assert "| `peer:diffusion-gemma(entropy_bound=1.0, max_denoising_steps=16)` |" in table
