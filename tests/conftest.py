"""Tiny random configs of the reference model classes: fast CPU fixtures."""

import os

# Triton kernels are tested by Triton's interpreter on the CPU; the flag must be set
# before anything (diffusers, through torch) imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import functools

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, WanTransformer3DModel

from cadence.reference.pipelines import RefImagePipeline, RefVideoPipeline

TEXT_DIM = 16


def tiny_wan(attention_head_dim: int = 12, ffn_dim: int = 32, num_layers: int = 3) -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=attention_head_dim, in_channels=3,
        out_channels=3, text_dim=TEXT_DIM, freq_dim=16, ffn_dim=ffn_dim, num_layers=num_layers, rope_max_seq_len=32,
    ).eval()


def tiny_flux() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=12, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
        axes_dims_rope=(4, 6, 6),
    ).eval()


def seeded_randn(*shape, seed: int = 0) -> torch.Tensor:
    """Fresh random values, the same for a given seed."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    """||y - reference|| / ||reference||."""
    return float((y - reference).norm() / reference.norm())


def text(batch: int = 1, tokens: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, tokens, TEXT_DIM, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def video_pipe() -> RefVideoPipeline:
    pipe = RefVideoPipeline(transformer=tiny_wan(), scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def image_pipe() -> RefImagePipeline:
    pipe = RefImagePipeline(transformer=tiny_flux(), scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def video_run(steps=6, seed=0, guidance_scale=3.0) -> dict:
    """The call of a tiny video pipeline: fixed text embeddings, 4 frames of 8 x 8."""
    return dict(prompt_embeds=text(seed=1), negative_prompt_embeds=text(seed=2), steps=steps,
                guidance_scale=guidance_scale, seed=seed, frames=4, height=8, width=8)


def image_run(steps=6, seed=0, guidance_scale=3.0) -> dict:
    pooled = torch.randn(1, TEXT_DIM, generator=torch.Generator().manual_seed(3))
    return dict(prompt_embeds=text(seed=1), pooled_prompt_embeds=pooled, negative_prompt_embeds=text(seed=2),
                negative_pooled_prompt_embeds=-pooled, steps=steps, guidance_scale=guidance_scale, seed=seed,
                height=8, width=8)


TINY_RUNS = {"video": video_run, "image": image_run}


def tiny_runs(steps: int) -> dict:
    """kind -> the call of a tiny pipeline, ``steps`` steps unless told otherwise."""
    return {kind: functools.partial(run, steps=steps) for kind, run in TINY_RUNS.items()}


def tiny_pipe(kind: str, transformer=None):
    """A tiny reference pipeline ("video": Wan, "image": FLUX) with a fresh random transformer."""
    if kind == "video":
        pipe = RefVideoPipeline(transformer=transformer or tiny_wan(), scheduler=FlowMatchEulerDiscreteScheduler())
    else:
        pipe = RefImagePipeline(transformer=transformer or tiny_flux(), scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(params=["video", "image"])
def kind(request) -> str:
    """Each tiny pipeline kind in turn, for tests that build their own (tiny_pipe)."""
    return request.param


def tiny_sample(pipe, kind: str, **kwargs) -> torch.Tensor:
    output = pipe(**TINY_RUNS[kind](**kwargs))
    return output.frames if kind == "video" else output.images


def _run_video(pipe, **kwargs) -> torch.Tensor:
    return tiny_sample(pipe, "video", **kwargs)


def _run_image(pipe, **kwargs) -> torch.Tensor:
    return tiny_sample(pipe, "image", **kwargs)


@pytest.fixture
def generate():
    """generate(pipe, steps=..., guidance_scale=..., seed=...) -> frames or images of a tiny pipeline."""

    def run(pipe, **kwargs):
        return (_run_video if isinstance(pipe, RefVideoPipeline) else _run_image)(pipe, **kwargs)

    return run


@pytest.fixture(params=["video", "image"])
def pipe(request, video_pipe, image_pipe):
    """Each tiny reference pipeline in turn: Wan (video) and FLUX (image)."""
    return video_pipe if request.param == "video" else image_pipe


@pytest.fixture
def make_model():
    return {"wan": tiny_wan, "flux": tiny_flux}


@pytest.fixture(scope="session")
def checkpoint_dirs(tmp_path_factory):
    """name ("wan", "flux") -> a tiny diffusers pipeline saved with save_pretrained (safetensors),
    built on first use. Tests must not write into these directories (calibrate with --out)."""
    from tiny_checkpoints import BUILDERS

    built = {}

    def directory(name: str):
        if name not in built:
            built[name] = tmp_path_factory.mktemp(f"checkpoint-{name}")
            BUILDERS[name]().save_pretrained(built[name])
        return built[name]

    return directory


def kill_at_the_second_call(monkeypatch, owner, name: str, run) -> None:
    """``run()`` with ``owner.name`` raising KeyboardInterrupt at its second call (a training run
    killed mid-way: the distill resume tests), the method restored afterwards."""
    original, calls = getattr(owner, name), []

    def killed(self):
        calls.append(self.step)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(owner, name, killed)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(owner, name, original)


# `cadence distill` options for a run of a few seconds on the CPU (the distill CLI tests)
TINY_DISTILL = ["--max-steps", "3", "--ode-steps", "1", "--ode-pairs", "2", "--teacher-steps", "2", "--batch-size", "2",
                "--critic-updates", "1", "--sample-steps", "2", "--device", "cpu"]
