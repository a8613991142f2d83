"""The reference pipelines: genuine diffusers ``DiffusionPipeline`` subclasses that call
the transformer the way diffusers' own Wan and Flux pipelines do — one
``cache_context("cond"/"uncond", step_index=...)`` per CFG branch, ``current_timestep``,
the progress bar, ``maybe_free_model_hooks`` at the end — so diffusers' hooks and tools
(``enable_cache``, ``save_pretrained``/``from_pretrained``) run on them unchanged.

Both models work in pixel space (values in [-1, 1]); there is no VAE. Requests that cannot
fit (a step count over the scheduler's timesteps, an output larger than the machine's memory)
are refused before anything is allocated, and a generation whose latents turn NaN or Inf stops
at that step (``FloatingPointError``), as cadence.generation does for diffusers' pipelines.

A few-step student (``cadence.distill``) is the same pipeline with ``student`` set (by
``cadence.loading`` from the checkpoint's ``student.json``): a call that names no step count or
guidance runs the student's K steps at its own sigmas, without CFG.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput

from cadence.generation import (
    check_finite_latents,
    check_guidance_scale,
    check_size_values,
    check_steps,
)
from cadence.reference import data
from cadence.reference.text import encode_prompts


@dataclass
class RefVideoOutput(BaseOutput):
    frames: torch.Tensor  # (B, T, 3, H, W) in [-1, 1], float32, on the CPU


@dataclass
class RefImageOutput(BaseOutput):
    images: torch.Tensor  # (B, 3, H, W) in [-1, 1], float32, on the CPU


def check_sampling_args(steps: int, guidance_scale: float) -> None:
    check_steps(steps)
    check_guidance_scale(guidance_scale)


def check_generation_args(prompt, prompt_embeds, steps: int, guidance_scale: float) -> list[str] | None:
    """Refuse bad arguments before any heavy work; returns the prompt list."""
    check_sampling_args(steps, guidance_scale)
    if prompt_embeds is not None:
        return None
    prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ValueError(f"prompt={prompt!r} is empty: give a caption, e.g. 'a small red square moves left over a blue gradient'")
    return prompts


class _RefPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->transformer"
    _optional_components = ["text_encoder", "tokenizer"]
    video = True  # which caption form the model was trained on: with motions (video) or without
    DEFAULT_SIZE = {"frames": 16, "height": 32, "width": 32}  # ref-video's; a checkpoint may name its own

    def check_captions(self, prompts: list[str] | None) -> None:
        """Refuse a prompt outside the world's grammar, naming its unknown words (the model
        was trained on these captions only; a diffusers pipeline takes any prompt). The
        negative prompt (empty for CFG) is not a caption and is not checked."""
        for prompt in prompts or ():
            try:
                data.parse_caption(prompt, video=self.video)
            except ValueError as error:
                raise ValueError(f"{error} (the reference models take captions of their world only; "
                                 "`cadence prompts` prints the grammar)") from None

    def __init__(self, transformer, scheduler: FlowMatchEulerDiscreteScheduler, text_encoder=None, tokenizer=None,
                 sample_size: dict | None = None):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)
        # The size made when none is named (ref-video-hd: 128 x 128): in the pipeline's config,
        # so save_pretrained / from_pretrained keep it and cadence.generation reads it.
        self.register_to_config(sample_size={k: v for k, v in (sample_size or self.DEFAULT_SIZE).items()
                                             if k in self.DEFAULT_SIZE})
        self._current_timestep = None

    # {"steps": K, "sigmas": [K floats], "guidance_scale": 1.0} for a distilled student, else None.
    student: dict | None = None

    def sampling_defaults(self, steps: int | None, guidance_scale: float | None) -> tuple[int, float]:
        """The given values, else the student's (K steps, guidance 1), else the teacher's (20, 4.0)."""
        student = self.student or {}
        return (student.get("steps", 20) if steps is None else steps,
                student.get("guidance_scale", 4.0) if guidance_scale is None else guidance_scale)

    def size(self, **given) -> tuple[int, ...]:
        """The given sizes, the checkpoint's own for those left None."""
        return tuple(self.config.sample_size[name] if value is None else value for name, value in given.items())

    @property
    def current_timestep(self):
        return self._current_timestep

    # prompt -> (tokens, pooled), consulted before the text encoder: precomputed embeddings
    # (text.save_prompt_embeddings) let a machine without the encoder run the same prompts.
    prompt_cache: dict | None = None

    def encode_prompt(self, prompts: list[str]):
        cache = self.prompt_cache or {}
        if all(prompt in cache for prompt in prompts):
            return tuple(torch.cat([cache[prompt][i] for prompt in prompts]) for i in (0, 1))
        if self.text_encoder is None or self.tokenizer is None:
            missing = [prompt for prompt in prompts if prompt not in cache]
            raise ValueError(
                f"this pipeline has no text encoder and no precomputed embedding for {missing[0]!r}: pass "
                "prompt_embeds (and negative_prompt_embeds), or load embeddings made by save_prompt_embeddings"
            )
        return encode_prompts(prompts, self.tokenizer, self.text_encoder)

    def _conditions(self, prompts, negative_prompt, prompt_embeds, negative_prompt_embeds, pooled, negative_pooled, cfg):
        """-> (tokens, pooled) for the cond branch and for the uncond branch (None without CFG)."""
        if prompt_embeds is None:
            prompt_embeds, pooled = self.encode_prompt(prompts)
        batch = prompt_embeds.shape[0]
        if cfg and negative_prompt_embeds is None:
            negative_prompt_embeds, negative_pooled = self.encode_prompt([negative_prompt] * batch)
        dtype, device = self.transformer.dtype, self._execution_device
        cast = lambda x: None if x is None else x.to(device=device, dtype=dtype)  # noqa: E731
        cond = (cast(prompt_embeds), cast(pooled))
        uncond = (cast(negative_prompt_embeds), cast(negative_pooled)) if cfg else None
        return cond, uncond

    def _denoise(self, latents, cond, uncond, steps: int, guidance_scale: float, predict):
        """The flow-matching loop with CFG as two transformer calls, like diffusers' Wan."""
        if self.student and steps == self.student["steps"]:  # the sigmas it was trained at, not an even spread
            self.scheduler.set_timesteps(sigmas=self.student["sigmas"], device=latents.device)
        else:
            self.scheduler.set_timesteps(steps, device=latents.device)
        self.scheduler.set_begin_index(0)
        timesteps = self.scheduler.timesteps
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                self._current_timestep = t
                where = {"step_index": i, "num_inference_steps": len(timesteps), "sigma": float(self.scheduler.sigmas[i])}
                with self.transformer.cache_context("cond", **where):
                    velocity = predict(latents, t, *cond)
                if uncond is not None:
                    with self.transformer.cache_context("uncond", **where):
                        velocity_uncond = predict(latents, t, *uncond)
                    velocity = velocity_uncond + guidance_scale * (velocity - velocity_uncond)
                latents = self.scheduler.step(velocity.float(), t, latents, return_dict=False)[0]
                check_finite_latents(latents, i, len(timesteps), t)
                progress_bar.update()
        self._current_timestep = None
        self.maybe_free_model_hooks()
        return latents


class RefVideoPipeline(_RefPipeline):
    """Text-to-video with a ``WanTransformer3DModel`` in pixel space."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str = "",
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int = 0,
        frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        num_inference_steps: int | None = None,
        return_dict: bool = True,
    ):
        steps, guidance_scale = self.sampling_defaults(num_inference_steps or steps, guidance_scale)
        frames, height, width = self.size(frames=frames, height=height, width=width)
        prompts = check_generation_args(prompt, prompt_embeds, steps, guidance_scale)
        self.check_captions(prompts)
        check_size_values(height, width, frames)
        _, patch_h, patch_w = self.transformer.config.patch_size
        if frames < 1 or height % patch_h or width % patch_w or height <= 0 or width <= 0:
            raise ValueError(
                f"frames={frames}, height={height}, width={width}: frames must be >= 1 and height/width "
                f"positive multiples of the patch size {patch_h}x{patch_w}"
            )
        cfg = guidance_scale > 1.0
        cond, uncond = self._conditions(prompts, negative_prompt, prompt_embeds, negative_prompt_embeds, None, None, cfg)
        batch = cond[0].shape[0]
        channels = self.transformer.config.in_channels
        generator = torch.Generator("cpu").manual_seed(seed)
        latents = torch.randn(batch, channels, frames, height, width, generator=generator)  # (B, C, T, H, W)
        latents = latents.to(self._execution_device)
        dtype = self.transformer.dtype

        def predict(x, t, tokens, _pooled):
            return self.transformer(
                hidden_states=x.to(dtype), timestep=t.expand(x.shape[0]), encoder_hidden_states=tokens, return_dict=False
            )[0]

        latents = self._denoise(latents, cond, uncond, steps, guidance_scale, predict)
        video = latents.clamp(-1, 1).permute(0, 2, 1, 3, 4).float().cpu()  # (B, T, 3, H, W)
        return RefVideoOutput(frames=video) if return_dict else (video,)


def pack(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): FLUX's 2x2 patch packing."""
    b, c, h, w = images.shape
    return images.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    b, _, packed = tokens.shape
    c = packed // 4
    return tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def image_ids(height: int, width: int, device) -> torch.Tensor:
    """(H/2 * W/2, 3) position ids (0, row, col), as FluxPipeline prepares them."""
    rows, cols = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float().to(device)


class RefImagePipeline(_RefPipeline):
    """Text-to-image with a ``FluxTransformer2DModel`` in pixel space (2x2-packed)."""

    video = False
    DEFAULT_SIZE = {"height": 32, "width": 32}

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str = "",
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        num_inference_steps: int | None = None,
        return_dict: bool = True,
    ):
        steps, guidance_scale = self.sampling_defaults(num_inference_steps or steps, guidance_scale)
        height, width = self.size(height=height, width=width)
        prompts = check_generation_args(prompt, prompt_embeds, steps, guidance_scale)
        self.check_captions(prompts)
        check_size_values(height, width)
        if height <= 0 or width <= 0 or height % 2 or width % 2:
            raise ValueError(f"height={height}, width={width} must be positive and even (2x2 packing)")
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("with prompt_embeds, pass pooled_prompt_embeds too")
        cfg = guidance_scale > 1.0
        cond, uncond = self._conditions(
            prompts, negative_prompt, prompt_embeds, negative_prompt_embeds,
            pooled_prompt_embeds, negative_pooled_prompt_embeds, cfg,
        )
        batch, text_tokens = cond[0].shape[:2]
        channels = self.transformer.config.in_channels // 4
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn(batch, channels, height, width, generator=generator)
        device, dtype = self._execution_device, self.transformer.dtype
        latents = pack(noise).to(device)  # (B, tokens, 4C)
        img_ids = image_ids(height, width, device).to(dtype)
        txt_ids = torch.zeros(text_tokens, 3, device=device, dtype=dtype)

        def predict(x, t, tokens, pooled):
            return self.transformer(
                hidden_states=x.to(dtype), timestep=(t / 1000).expand(x.shape[0]).to(dtype),
                encoder_hidden_states=tokens, pooled_projections=pooled,
                img_ids=img_ids, txt_ids=txt_ids, return_dict=False,
            )[0]

        latents = self._denoise(latents, cond, uncond, steps, guidance_scale, predict)
        images = unpack(latents.float(), height, width).clamp(-1, 1).cpu()  # (B, 3, H, W)
        return RefImageOutput(images=images) if return_dict else (images,)
