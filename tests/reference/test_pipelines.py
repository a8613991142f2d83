"""The reference pipelines behave like diffusers' own: diffusers' cache hooks run on them
unchanged, the step context sees every step and CFG branch, save/load round-trips, and
bad arguments are refused before any transformer forward."""

import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig

import cadence
from cadence.reference.pipelines import RefVideoPipeline

TEXT_DIM = 16  # tests/conftest.py's tiny models


def _relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return ((x - reference).norm() / reference.norm()).item()


# -- diffusers' cache hooks ------------------------------------------------------------

DIFFUSERS_CACHES = {
    "first-block": lambda pipe: FirstBlockCacheConfig(threshold=0.2),
    # diffusers' default TaylorSeer identifiers ("^blocks.*attn", fullmatch) miss Wan's attn1/attn2.
    "taylorseer": lambda pipe: TaylorSeerCacheConfig(
        cache_interval=2, disable_cache_before_step=1, taylor_factors_dtype=torch.float32,
        cache_identifiers=[r"^blocks\.\d+\.attn\d$"],
    ),
    # Reads the pipeline's current_timestep, as it does on diffusers' WanPipeline.
    "pyramid-attention-broadcast": lambda pipe: PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=lambda: pipe.current_timestep,
    ),
}


@pytest.mark.parametrize("cache", DIFFUSERS_CACHES)
def test_diffusers_cache_hooks_run_unchanged(video_pipe, generate, cache):
    baseline = generate(video_pipe)
    video_pipe.transformer.enable_cache(DIFFUSERS_CACHES[cache](video_pipe))
    try:
        cached = generate(video_pipe)
        # maybe_free_model_hooks at the end of a call resets the hooks' state: a second call repeats.
        assert torch.equal(generate(video_pipe), cached)
    finally:
        video_pipe.transformer.disable_cache()
    assert not torch.equal(cached, baseline)  # the cache skipped something
    assert _relative_error(cached, baseline) < 0.5
    assert torch.equal(generate(video_pipe), baseline)


# -- the step context ------------------------------------------------------------------

def _context_records(pipe, generate, steps, guidance_scale, generations=1):
    """(step_index, num_steps, branch) as the context reads inside each transformer forward."""
    records = []
    with cadence.accelerate(pipe, "fixed-interval(interval=1)"):
        context = cadence.get_context(pipe.transformer)
        # On the first block, not the transformer: a torch pre-hook on the transformer runs
        # before diffusers' hook chain, so before the context is filled for that forward.
        hook = pipe.transformer.blocks[0].register_forward_pre_hook(
            lambda module, args: records.append((context.step_index, context.num_steps, context.branch))
        )
        try:
            for _ in range(generations):
                generate(pipe, steps=steps, guidance_scale=guidance_scale)
        finally:
            hook.remove()
    return records


def test_context_sees_every_step_and_cfg_branch(video_pipe, generate):
    records = _context_records(video_pipe, generate, steps=4, guidance_scale=3.0, generations=2)
    one_generation = [(step, 4, branch) for step in range(4) for branch in ("cond", "uncond")]
    assert records == one_generation * 2  # the step index starts again at 0 for the next generation


def test_context_without_guidance_sees_only_the_cond_branch(video_pipe, generate):
    records = _context_records(video_pipe, generate, steps=4, guidance_scale=1.0)
    assert records == [(step, 4, "cond") for step in range(4)]


# -- save / load -----------------------------------------------------------------------

def test_save_and_load_round_trips(video_pipe, generate, tmp_path):
    expected = generate(video_pipe, steps=3)
    video_pipe.save_pretrained(tmp_path)
    assert not list(tmp_path.rglob("*.bin"))

    loaded = RefVideoPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.text_encoder is None and loaded.tokenizer is None
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.scheduler.config) == public(video_pipe.scheduler.config)
    parameters = dict(video_pipe.transformer.named_parameters())
    for name, value in loaded.transformer.named_parameters():
        assert torch.equal(value, parameters.pop(name)), name
    assert not parameters
    # Weights mapped from a safetensors file can sit at an 8-byte offset, and the CPU BLAS
    # then rounds float32 differently (an ulp); in fresh memory the output is bit-identical.
    torch.testing.assert_close(generate(loaded, steps=3), expected, rtol=0, atol=1e-5)
    for value in loaded.transformer.parameters():
        value.data = value.data.clone()
    assert torch.equal(generate(loaded, steps=3), expected)


# -- refusals --------------------------------------------------------------------------

def _arguments(pipe, **overrides) -> dict:
    """Valid tiny-pipeline arguments with the given ones replaced."""
    text = torch.randn(1, 5, TEXT_DIM, generator=torch.Generator().manual_seed(1))
    arguments = dict(prompt_embeds=text, negative_prompt_embeds=-text, steps=3, guidance_scale=3.0, height=8, width=8)
    if isinstance(pipe, RefVideoPipeline):
        arguments["frames"] = 2
    else:
        pooled = torch.randn(1, TEXT_DIM, generator=torch.Generator().manual_seed(2))
        arguments.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=-pooled)
    arguments.update(overrides)
    return arguments


BAD_ARGUMENTS = {
    "steps=0": (dict(steps=0), "steps=0"),
    "guidance_scale=-1": (dict(guidance_scale=-1), "guidance_scale=-1"),
    "empty prompt": (dict(prompt="", prompt_embeds=None, negative_prompt_embeds=None), "empty"),
    "blank prompt list": (dict(prompt=["a red square", " "], prompt_embeds=None, negative_prompt_embeds=None), "empty"),
    "height=7": (dict(height=7), "height=7"),
}


@pytest.mark.parametrize("bad", BAD_ARGUMENTS)
def test_bad_arguments_are_refused_before_generating(pipe, bad):
    overrides, message = BAD_ARGUMENTS[bad]
    forwards = []
    hook = pipe.transformer.register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        pipe(**_arguments(pipe))  # the valid call runs
        assert forwards
        forwards.clear()
        with pytest.raises(ValueError, match=message):
            pipe(**_arguments(pipe, **overrides))
    finally:
        hook.remove()
    assert not forwards


def test_precomputed_prompt_embeddings_stand_in_for_the_text_encoder(video_pipe, tmp_path):
    """The GPU machine has no text encoder: prompts encoded elsewhere give the same output as
    passing the embeddings directly, and a prompt not in the file is named in the error."""
    from conftest import text

    video_pipe.prompt_cache = {"a red square": (text(seed=1), torch.zeros(1, 16)), "": (text(seed=2), torch.zeros(1, 16))}
    kwargs = dict(steps=3, guidance_scale=3.0, frames=4, height=8, width=8)
    by_prompt = video_pipe(prompt="a red square", **kwargs).frames
    by_embeds = video_pipe(prompt_embeds=text(seed=1), negative_prompt_embeds=text(seed=2), **kwargs).frames
    assert torch.equal(by_prompt, by_embeds)
    with pytest.raises(ValueError, match="no precomputed embedding for 'a blue circle'"):
        video_pipe(prompt="a blue circle", **kwargs)


def test_prompt_embeddings_file_round_trips(tmp_path):
    from cadence.reference.text import load_prompt_embeddings, save_prompt_embeddings

    path = save_prompt_embeddings(["a red square moves left", "a blue circle"], tmp_path / "e.safetensors")
    cache = load_prompt_embeddings(path)
    assert set(cache) == {"a red square moves left", "a blue circle", ""}
    tokens, pooled = cache["a blue circle"]
    assert tokens.shape == (1, 24, 384) and pooled.shape == (1, 384)
    assert not torch.equal(tokens, cache["a red square moves left"][0])
