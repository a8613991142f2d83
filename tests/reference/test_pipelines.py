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
    "blank prompt list": (dict(prompt=["a small red square over a plain blue background", " "], prompt_embeds=None, negative_prompt_embeds=None), "empty"),
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

    square = "a small red square moves left over a plain blue background"
    video_pipe.prompt_cache = {square: (text(seed=1), torch.zeros(1, 16)), "": (text(seed=2), torch.zeros(1, 16))}
    kwargs = dict(steps=3, guidance_scale=3.0, frames=4, height=8, width=8)
    by_prompt = video_pipe(prompt=square, **kwargs).frames
    by_embeds = video_pipe(prompt_embeds=text(seed=1), negative_prompt_embeds=text(seed=2), **kwargs).frames
    assert torch.equal(by_prompt, by_embeds)
    circle = "a large blue circle grows over a red gradient"
    with pytest.raises(ValueError, match=f"no precomputed embedding for '{circle}'"):
        video_pipe(prompt=circle, **kwargs)


def test_prompt_embeddings_file_round_trips(tmp_path):
    from cadence.reference.text import load_prompt_embeddings, save_prompt_embeddings

    path = save_prompt_embeddings(["a red square moves left", "a blue circle"], tmp_path / "e.safetensors")
    cache = load_prompt_embeddings(path)
    assert set(cache) == {"a red square moves left", "a blue circle", ""}
    tokens, pooled = cache["a blue circle"]
    assert tokens.shape == (1, 24, 384) and pooled.shape == (1, 384)
    assert not torch.equal(tokens, cache["a red square moves left"][0])


# -- the world's grammar ----------------------------------------------------------------

OUTSIDE_THE_GRAMMAR = {
    "unknown words": ("a small magenta hexagon moves left over a plain white background",
                      ["unknown words 'magenta', 'hexagon'", "colours: red", "shapes: circle", "cadence prompts"]),
    "missing size": ("a red square moves left over a blue gradient", ["missing size word before 'red square'", "'small'"]),
    "no background": ("a small red square moves left", ["no background"]),
    "image form for the video model": ("a small red square over a blue gradient", ["motion for every object", "moves left"]),
}


@pytest.mark.parametrize("case", OUTSIDE_THE_GRAMMAR)
def test_a_prompt_outside_the_grammar_is_refused_naming_the_words(video_pipe, case):
    prompt, fragments = OUTSIDE_THE_GRAMMAR[case]
    forwards = []
    hook = video_pipe.transformer.register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        with pytest.raises(ValueError) as refused:
            video_pipe(prompt=prompt, steps=2, guidance_scale=3.0, frames=2, height=8, width=8)
    finally:
        hook.remove()
    for fragment in fragments:
        assert fragment in str(refused.value)
    assert not forwards


def test_the_image_pipeline_takes_the_image_form_and_refuses_motions(image_pipe):
    from conftest import text

    caption = "a large white ring over an orange checkerboard"
    image_pipe.prompt_cache = {caption: (text(seed=1), torch.zeros(1, 16)), "": (text(seed=2), torch.zeros(1, 16))}
    images = image_pipe(prompt=caption, steps=2, guidance_scale=3.0, height=8, width=8).images
    assert images.shape == (1, 3, 8, 8)  # the empty negative prompt of CFG is not refused
    with pytest.raises(ValueError, match="no motion words"):
        image_pipe(prompt="a large white ring grows over an orange checkerboard", steps=2, height=8, width=8)


def test_a_pipeline_makes_its_own_size_when_none_is_named_and_keeps_it_when_saved(tmp_path):
    """ref-video-hd runs ref-video's class at 128 x 128: its size lives in the pipeline's
    config, so a call, cadence.generation and a save/load round trip all use it."""
    from conftest import text, tiny_wan
    from diffusers import FlowMatchEulerDiscreteScheduler

    from cadence.generation import default_size

    pipe = RefVideoPipeline(transformer=tiny_wan(), scheduler=FlowMatchEulerDiscreteScheduler(),
                            sample_size={"frames": 2, "height": 12, "width": 8})
    pipe.set_progress_bar_config(disable=True)
    assert (default_size(pipe).frames, default_size(pipe).height, default_size(pipe).width) == (2, 12, 8)
    video = pipe(prompt_embeds=text(seed=1), negative_prompt_embeds=text(seed=2), steps=1).frames
    assert video.shape[1:] == (2, 3, 12, 8)  # (B, T, 3, H, W)
    pipe.save_pretrained(tmp_path)
    assert RefVideoPipeline.from_pretrained(tmp_path).config.sample_size == {"frames": 2, "height": 12, "width": 8}
    assert default_size(RefVideoPipeline(transformer=tiny_wan(), scheduler=FlowMatchEulerDiscreteScheduler())).height == 32
