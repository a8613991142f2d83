"""What a few-step student is: K evenly spread sigmas (through its teacher's shift), an Euler chain over them
without CFG, and the reference transformers called in their pipelines' own latent layout.

Rectified flow (reference/train.py): x_sigma = (1 - sigma) x0 + sigma * noise, and the
transformer predicts the velocity v = noise - x0, so x0 = x_sigma - sigma * v. The student keeps
that parameterisation: it is trained through its x0 prediction, and it samples with the same
Euler step as ``FlowMatchEulerDiscreteScheduler`` (x <- x + (sigma_next - sigma) v), so the
checkpoint runs in the unchanged reference pipeline (``cadence.load`` sets its sigmas).

The user's own Wan (``WanPipeline``) and FLUX (``FluxPipeline``) checkpoints are called the same
way in their pipelines' latent space (``user.py`` holds what else they need: prompts, the VAE,
the output folder): Wan's transformer takes the reference video call unchanged (timestep sigma *
1000), FLUX's the reference image call on 2x2-packed VAE latents plus, for a guidance-distilled
FLUX.1-dev, its ``guidance`` embedding at every forward (no CFG: ``guided_velocity`` is then the
conditional velocity at that guidance).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from cadence.distill import user
from cadence.distill.user import family
from cadence.reference.pipelines import (
    RefImagePipeline,
    RefVideoPipeline,
    image_ids,
    pack,
    unpack,
)


def schedule_sigmas(scheduler: FlowMatchEulerDiscreteScheduler, steps: int) -> list[float]:
    """The sigmas the scheduler itself uses for a ``steps``-step generation (the teacher's)."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    scheduler.set_timesteps(steps)
    return [float(s) for s in scheduler.sigmas[:steps]]


def student_sigmas(scheduler: FlowMatchEulerDiscreteScheduler, steps: int) -> list[float]:
    """The student's K sigmas: 1 - k / K for k < K, through the teacher's shift, as float32.

    DMD2's spacing (timesteps 999, 749, 499, 249 for 4 steps). The scheduler's own K-step
    sigmas run from 1 to its sigma_min (0.001) and would spend the student's last step on an
    almost clean input: a 2-step student would get 1.0 and 0.001, one useful step."""
    if scheduler.config.get("use_dynamic_shifting"):
        raise ValueError(
            "the teacher's scheduler shifts by resolution (use_dynamic_shifting): cadence distill needs a fixed shift"
        )
    shift = scheduler.config.get("shift", 1.0)
    even = torch.tensor([1 - k / steps for k in range(steps)], dtype=torch.float64)
    return (shift * even / (1 + (shift - 1) * even)).float().tolist()


def student_scheduler(scheduler: FlowMatchEulerDiscreteScheduler) -> FlowMatchEulerDiscreteScheduler:
    """The teacher's scheduler with shift 1: set_timesteps(sigmas=...) shifts what it is given,
    and a student's sigmas are stored already shifted."""
    return FlowMatchEulerDiscreteScheduler.from_config(scheduler.config, shift=1.0, use_dynamic_shifting=False)


def refined_grid(sigmas: list[float], substeps: int) -> tuple[list[float], list[int]]:
    """The student's sigmas (and the terminal 0) with each interval split into ``substeps``
    equal Euler steps: the teacher's grid for ODE pairs. -> (grid with the final 0, the index
    in the grid of each student sigma)."""
    ends = [*sigmas, 0.0]
    grid, marks = [], []
    for k in range(len(sigmas)):
        marks.append(len(grid))
        grid += torch.linspace(ends[k], ends[k + 1], substeps + 1)[:-1].tolist()
    return grid + [0.0], marks


@dataclass
class Condition:
    """Text conditions of one batch: tokens (B, L, D) and FLUX's pooled (B, D), else None."""

    tokens: torch.Tensor
    pooled: torch.Tensor | None = None

    def to(self, device) -> Condition:
        return Condition(self.tokens.to(device), None if self.pooled is None else self.pooled.to(device))


class Denoiser:
    """A pipeline's transformer call in the pipeline's latent layout: video (B, C, T, H, W);
    image 2x2-packed (B, H/2 * W/2, 4C). ``size``: frames/height/width, in latents for the
    reference pipelines (they have no VAE), in pixels for a user's Wan or FLUX. ``guidance``: a
    guidance-distilled FLUX's embedded guidance (its teacher's "CFG"). ``scheduler``: the
    teacher's, at a fixed shift (``user.fixed_shift``: FLUX shifts by resolution)."""

    def __init__(self, pipe, size: dict, guidance: float | None = None):
        self.family = family(pipe)
        self.reference = self.family.startswith("ref-")
        self.video = self.family in ("ref-video", "wan")
        self.size = dict(size)
        self.latent, self.scheduler, self.vae = dict(size), pipe.scheduler, None
        if not self.reference:
            self.latent, self.scheduler, self.vae = user.latent_size(pipe, size), user.fixed_shift(pipe, size), pipe.vae
        channels = pipe.transformer.config.in_channels
        self.channels = channels if self.video else channels // 4
        embedded = self.family == "flux" and pipe.transformer.config.guidance_embeds
        self.guidance = guidance if embedded else None

    def noise(self, batch: int, generator: torch.Generator, device) -> torch.Tensor:
        if self.video:
            shape = (batch, self.channels, self.latent["frames"], self.latent["height"], self.latent["width"])
            return torch.randn(shape, generator=generator, device=device)
        shape = (batch, self.channels, self.latent["height"], self.latent["width"])
        return pack(torch.randn(shape, generator=generator, device=device))

    def velocity(self, transformer, x: torch.Tensor, sigma: torch.Tensor, condition: Condition) -> torch.Tensor:
        """v at noise level ``sigma`` (B,), timesteps as the pipelines pass them."""
        if self.video:
            return transformer(
                hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=condition.tokens, return_dict=False
            )[0].float()
        guidance = None if self.guidance is None else torch.full_like(sigma, self.guidance)
        return transformer(
            hidden_states=x,
            timestep=sigma,
            guidance=guidance,
            encoder_hidden_states=condition.tokens,
            pooled_projections=condition.pooled,
            img_ids=image_ids(self.latent["height"], self.latent["width"], x.device),
            txt_ids=torch.zeros(condition.tokens.shape[1], 3, device=x.device),
            return_dict=False,
        )[0].float()

    def x0(self, transformer, x, sigma, condition: Condition) -> torch.Tensor:
        """x0 = x - sigma * v: the clean sample the transformer's velocity points to."""
        return x - _per_sample(sigma, x) * self.velocity(transformer, x, sigma, condition)

    def guided_velocity(
        self, transformer, x, sigma, condition: Condition, empty: Condition | None, guidance_scale: float
    ) -> torch.Tensor:
        """CFG as the pipelines apply it; at guidance <= 1 the conditional branch alone (one
        forward, and exactly the unguided velocity)."""
        velocity = self.velocity(transformer, x, sigma, condition)
        if guidance_scale <= 1.0 or empty is None or self.family == "flux":  # FLUX: embedded guidance, no CFG
            return velocity
        unconditional = self.velocity(transformer, x, sigma, empty)
        return unconditional + guidance_scale * (velocity - unconditional)

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Latents -> cadence's pixels: videos (B, T, 3, H, W), images (B, 3, H, W), in [-1, 1]."""
        if not self.reference:
            return user.decode(self, x)
        if self.video:
            return x.clamp(-1, 1).permute(0, 2, 1, 3, 4).float().cpu()
        return unpack(x.float(), self.size["height"], self.size["width"]).clamp(-1, 1).cpu()


def _per_sample(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.view((-1,) + (1,) * (x.dim() - 1))


def full(batch: int, value: float, device) -> torch.Tensor:
    return torch.full((batch,), value, device=device)


def euler(
    denoiser: Denoiser,
    transformer,
    x: torch.Tensor,
    grid: list[float],
    condition: Condition,
    empty: Condition | None = None,
    guidance_scale: float = 1.0,
    keep: list[int] | None = None,
):
    """Euler over ``grid`` (sigmas, the last the target) as the scheduler steps; -> the final x
    and the states at the grid indices in ``keep``."""
    kept = []
    for i in range(len(grid) - 1):
        if keep is not None and i in keep:
            kept.append(x)
        sigma = full(x.shape[0], grid[i], x.device)
        x = x + (grid[i + 1] - grid[i]) * denoiser.guided_velocity(
            transformer, x, sigma, condition, empty, guidance_scale
        )
    return x, kept


def student_pipeline(teacher_pipe, transformer, sigmas: list[float], size: dict, scheduler=None):
    """The student as a pipeline of its teacher's class: its transformer, the teacher's
    ``scheduler`` (default: the pipeline's) at shift 1; a reference student has its schedule as
    defaults (``_RefPipeline.student``) and no text encoder (the loader adds it), a user's keeps
    the teacher's other components (those freed are linked from its folder: ``user.write_folder``)."""
    scheduler = student_scheduler(scheduler or teacher_pipe.scheduler)
    if not isinstance(teacher_pipe, (RefVideoPipeline, RefImagePipeline)):
        return type(teacher_pipe)(**(teacher_pipe.components | {"transformer": transformer, "scheduler": scheduler}))
    pipe = type(teacher_pipe)(transformer=transformer, scheduler=scheduler, sample_size=size)
    pipe.student = {"steps": len(sigmas), "sigmas": list(sigmas), "guidance_scale": 1.0}
    pipe.set_progress_bar_config(disable=True)
    return pipe


def trainable_copy(transformer) -> torch.nn.Module:
    return copy.deepcopy(transformer).float().train().requires_grad_(True)
