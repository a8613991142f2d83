"""``cadence.generation``: one generation in each pipeline's own argument names, its size
checked against the checkpoint before any work, the output as pixels in [-1, 1], and a
generation whose latents turn non-finite stopped at that step."""

import pytest
import torch
from conftest import tiny_pipe
from tiny_checkpoints import FLUX_SIZE, WAN_SIZE, tiny_flux_pipeline, tiny_wan_pipeline

from cadence import generation
from cadence.generation import Size


@pytest.fixture(scope="module")
def wan():
    return tiny_wan_pipeline()


@pytest.fixture(scope="module")
def flux():
    return tiny_flux_pipeline()


def test_reference_pipelines_are_called_in_their_own_names():
    size = Size(8, 8, 4)
    arguments = generation.call_arguments(tiny_pipe("video"), "a red square", steps=3, seed=5, guidance_scale=2.0,
                                          size=size)
    assert arguments == dict(prompt="a red square", guidance_scale=2.0, steps=3, seed=5, height=8, width=8, frames=4)


def test_diffusers_pipelines_are_called_in_theirs(wan, flux):
    video = generation.call_arguments(wan, "a cat", steps=3, seed=5, guidance_scale=2.0, size=Size(16, 16, 5))
    assert video["num_inference_steps"] == 3 and video["num_frames"] == 5 and video["output_type"] == "pt"
    assert video["generator"].initial_seed() == 5 and "steps" not in video and "seed" not in video
    image = generation.call_arguments(flux, "a cat", steps=3, seed=5, guidance_scale=2.0, size=Size(16, 16))
    assert "num_frames" not in image and "frames" not in image and image["height"] == 16
    assert generation.call_arguments(flux, "a cat", steps=3, seed=5, guidance_scale=2.0, size=Size(16, 16),
                                     decode=False)["output_type"] == "latent"


@pytest.mark.parametrize("name, size, shape", [("wan", WAN_SIZE, (5, 3, 16, 16)), ("flux", FLUX_SIZE, (3, 16, 16))])
def test_output_is_pixels_in_minus_one_to_one_whatever_the_pipelines_output_type(request, name, size, shape):
    pipe = request.getfixturevalue(name)
    pixels = generation.generate(pipe, "a cat", steps=2, seed=0, guidance_scale=3.0, size=Size(**size))
    assert pixels.shape == shape and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1 and pixels.min() < 0  # [0, 1] was mapped, not clipped to it
    expected = pipe("a cat", num_inference_steps=2, guidance_scale=3.0, output_type="pt",
                    generator=torch.Generator().manual_seed(0), **{("num_frames" if k == "frames" else k): v
                                                                   for k, v in size.items()})[0][0]
    torch.testing.assert_close(pixels, expected * 2 - 1)


def test_default_sizes_are_the_checkpoints_own(wan, flux):
    assert generation.default_size(wan) == Size(480, 832, 81)  # WanPipeline's __call__ defaults
    assert generation.default_size(flux) == Size(128, 128)  # default_sample_size x the VAE's scale (1)
    assert generation.default_size(tiny_pipe("video")) == Size(32, 32, 16)


def test_the_valid_multiple_comes_from_the_vae_and_the_patch(wan, flux):
    assert generation.geometry(wan).spatial == 16  # VAE 8 x patch 2
    assert generation.geometry(flux).spatial == 2  # VAE 1 x patch 1 x 2 x 2 packing
    assert generation.geometry(tiny_pipe("video")).spatial == 2  # pixel space, patch 2
    assert generation.geometry(tiny_pipe("image")).spatial == 2  # pixel space, 2 x 2 packing


def test_a_size_beyond_memory_is_refused_naming_the_limit(monkeypatch):
    monkeypatch.setattr(generation, "memory_bytes", lambda: 2**30)
    with pytest.raises(ValueError, match=r"frames=100, height=1024, width=1024: the decoded output alone would take "
                                         r"1.2 GiB as float32, over this machine's 1.0 GiB"):
        generation.check_size_values(1024, 1024, 100)
    generation.check_size_values(512, 512, 100)  # 0.3 GiB: fits


def test_a_reference_pipeline_refuses_what_cannot_fit_before_allocating(monkeypatch):
    pipe = tiny_pipe("video")
    forwards = []
    pipe.transformer.register_forward_pre_hook(lambda module, args: forwards.append(1))
    with pytest.raises(ValueError, match=r"steps=100000000 is over the limit of 1000"):
        pipe(prompt_embeds=torch.zeros(1, 5, 16), steps=100_000_000, guidance_scale=1.0)
    with pytest.raises(ValueError, match=r"frames=100000, height=8192, width=8192: .* GiB as float32"):
        pipe(prompt_embeds=torch.zeros(1, 5, 16), steps=2, guidance_scale=1.0, frames=100_000, height=8192, width=8192)
    assert forwards == []


def _nan_from_call(transformer, call: int):
    """From its ``call``-th forward on (1-based), the transformer answers NaN."""
    calls = []

    def hook(module, args, kwargs, output):
        calls.append(1)
        if len(calls) >= call:
            first = output[0] if isinstance(output, tuple) else output.sample
            first.fill_(float("nan"))
        return output

    transformer.register_forward_hook(hook, with_kwargs=True)
    return calls


def test_a_reference_generation_whose_latents_turn_nan_stops_at_that_step():
    pipe = tiny_pipe("video")
    calls = _nan_from_call(pipe.transformer, call=3)  # CFG: two forwards per step, the 3rd is in step 2
    with pytest.raises(FloatingPointError, match=r"latents turned NaN at step 2 of 5"):
        pipe(prompt_embeds=torch.zeros(1, 5, 16), negative_prompt_embeds=torch.ones(1, 5, 16), steps=5,
             guidance_scale=3.0, frames=2, height=8, width=8)
    assert len(calls) == 4  # stopped after step 2: steps 3-5 never ran


def test_a_diffusers_generation_whose_latents_turn_nan_stops_at_that_step():
    pipe = tiny_wan_pipeline()
    calls = _nan_from_call(pipe.transformer, call=3)
    with pytest.raises(FloatingPointError, match=r"latents turned NaN at step 2 of 4 \(timestep"):
        generation.generate(pipe, "a cat", steps=4, seed=0, guidance_scale=3.0, size=Size(**WAN_SIZE))
    assert len(calls) == 4


def test_a_distilled_student_runs_its_own_steps_without_cfg_unless_told_otherwise():
    """``generation.sampling``, which cadence generate, bench and calibrate use when --steps or
    --guidance-scale is not given: a student's K steps and guidance 1, else 20 steps at 4.0."""
    pipe = tiny_pipe("video")
    assert generation.sampling(pipe) == (20, 4.0)
    assert generation.sampling(None, 7, 2.5) == (7, 2.5)  # a diffusers pipeline: what is given, else 20 / 4.0
    pipe.student = {"steps": 3, "sigmas": [1.0, 0.75, 0.5], "guidance_scale": 1.0}
    try:
        assert generation.sampling(pipe) == (3, 1.0)
        assert generation.sampling(pipe, 10, None) == (10, 1.0)
        assert generation.sampling(pipe, None, 4.0) == (3, 4.0)
    finally:
        pipe.student = None
