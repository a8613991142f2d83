"""The two reference models: small configs of the same diffusers classes as Wan2.1 and
FLUX.1, trained by ``cadence train`` and shipped in ``reference/checkpoints/``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, WanTransformer3DModel

from cadence.reference.pipelines import RefImagePipeline, RefVideoPipeline
from cadence.reference.text import TEXT_DIM

CHECKPOINTS = Path(__file__).parent / "checkpoints"


@dataclass(frozen=True)
class ReferenceModel:
    name: str
    task: str  # "video" | "image"
    transformer_cls: type
    pipeline_cls: type
    config: dict
    sample: dict = field(default_factory=dict)  # the size it was trained at
    shift: float = 1.0  # flow-matching timestep shift used in training and sampling

    @property
    def checkpoint(self) -> Path:
        return CHECKPOINTS / self.name

    def build(self) -> torch.nn.Module:
        return self.transformer_cls(**self.config)

    def scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=self.shift)


# ref-video's transformer; ref-video-hd has the same, run at 16 times the tokens. ~9 M parameters.
REF_VIDEO_CONFIG = dict(
    patch_size=(1, 4, 4), num_attention_heads=4, attention_head_dim=64, in_channels=3, out_channels=3,
    text_dim=TEXT_DIM, freq_dim=256, ffn_dim=1024, num_layers=8, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", rope_max_seq_len=256,
)

REFERENCE_MODELS: dict[str, ReferenceModel] = {
    "ref-video": ReferenceModel(
        name="ref-video",
        task="video",
        transformer_cls=WanTransformer3DModel,
        pipeline_cls=RefVideoPipeline,
        # 16 frames x 32 x 32 RGB pixels, patch 1x4x4: 1,024 tokens.
        config=REF_VIDEO_CONFIG,
        sample=dict(frames=16, height=32, width=32),
    ),
    "ref-video-hd": ReferenceModel(
        name="ref-video-hd",
        task="video",
        transformer_cls=WanTransformer3DModel,
        pipeline_cls=RefVideoPipeline,
        # ref-video's architecture at 16 frames x 128 x 128 pixels: 16 x 32 x 32 = 16,384 video
        # tokens a clip, half of Wan2.1-1.3B's 32,760 at 480p x 81 frames, so attention is as
        # long-range as a real video model's (ref-video: 1,024 tokens). Same weights shape as
        # ref-video, so training starts from it (the card says how).
        config=REF_VIDEO_CONFIG,
        sample=dict(frames=16, height=128, width=128),
    ),
    "ref-image": ReferenceModel(
        name="ref-image",
        task="image",
        transformer_cls=FluxTransformer2DModel,
        pipeline_cls=RefImagePipeline,
        # 32 x 32 RGB pixels, 2x2-packed: 256 tokens; ~9 M parameters.
        config=dict(
            patch_size=1, in_channels=12, num_layers=2, num_single_layers=4, attention_head_dim=64,
            num_attention_heads=4, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
            guidance_embeds=False, axes_dims_rope=(16, 24, 24),
        ),
        sample=dict(height=32, width=32),
    ),
}


# Few-step students of the reference models made by ``cadence distill`` and shipped beside them,
# opened by name like any checkpoint folder (``cadence.load("ref-video-4step")``). ref-stream: the
# causal, chunk-wise student of ref-video for ``cadence stream`` (issue 18; ``cadence distill --method
# self-forcing --chunk-frames 4``), its folder written by that run on the GPU.
STUDENTS: dict[str, Path] = {
    "ref-video-4step": CHECKPOINTS / "ref-video-4step",
    "ref-stream": CHECKPOINTS / "ref-stream",
}


def reference_model(name: str) -> ReferenceModel:
    if name not in REFERENCE_MODELS:
        raise ValueError(f"unknown reference model {name!r}; valid: {', '.join(REFERENCE_MODELS)}")
    return REFERENCE_MODELS[name]

