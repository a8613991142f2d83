"""Consistency distillation on the teacher's probability-flow ODE: Song et al. 2023, "Consistency
Models" (arXiv 2303.01469, CD), guidance-distilled as in LCM (Luo et al. 2023, "Latent Consistency
Models", arXiv 2310.04378): the teacher's ODE step uses CFG at the teacher's guidance, the student
runs without it.

Flow-matching parameterisation: the student predicts the velocity v, and its consistency function
is its x0 prediction,

    f(x, s) = x - s * v(x, s),       so f(x, 0) = x: CM's boundary condition by construction

(CM and LCM reach it through c_skip / c_out; here s = 0 multiplies v away exactly). On the teacher
grid (the student's sigmas each split into equal Euler steps, ``student.refined_grid``; N
intervals, 0 at its end) one step pairs two points of one teacher ODE trajectory ``skip`` fine
intervals apart (LCM's skipping step k):

    x_{n}      = (1 - s_n) x0 + s_n * noise                 (s_n = grid[n], n ~ U{0 .. N-1})
    x_{n+k}    = x_{n} + (s_{n+k} - s_n) * v_cfg(x_n, s_n)   (one teacher Euler step with CFG)
    loss       = d(f_student(x_n, s_n), stopgrad f_target(x_{n+k}, s_{n+k})),

with s_{n+k} = grid[min(n + k, N)] (a pair that reaches 0 meets the boundary: its target is
x_{n+k} itself), d the pseudo-Huber distance of improved consistency training (Song & Dhariwal
2023, arXiv 2310.14189): sqrt(||a - b||^2 + c^2) - c per sample with c = 0.00054 sqrt(dim), and
the target network an EMA of the student (decay ``ema_decay``, 0.95 as LCM and CM's CD). The
grid runs from noise (index 0, s = 1) to data (index N, s = 0): "n + k" is the less noisy point.

Sampling needs nothing new: the student's Euler step x + (s' - s) v is exactly deterministic
multistep consistency sampling x' = (1 - s') f(x, s) + s' * noise_implied, with the noise the
velocity implies, noise_implied = x + (1 - s) v (``multistep_sample``; the identity is tested), so
the checkpoint runs in the unchanged pipeline at the student's sigmas.

Where this differs from the papers, and why:
- No data set: x0 are the teacher's own samples with CFG (the ends of the ODE pairs' trajectories,
  ``ode_pairs`` of them), as DMD in this package is data-free; fresh noise each step. More
  ``ode_pairs``, more data.
- No guidance-scale conditioning (LCM samples w and embeds it): one fixed guidance, the teacher's,
  the one the shipped student was distilled at.
- The teacher's solver is its own Euler step (LCM: DDIM, DPM-Solver); with skip k the step spans k
  fine intervals in one step (LCM's skipped DDIM step), one CFG teacher call (2 forwards).
- n is drawn over every fine interval, not only over multiples of k (LCM's skipped grid): the
  student's own sigmas are points of the grid whatever k is.
- Multistep sampling re-noises with the implied noise, not fresh noise (CM's Algorithm 1): that
  is what the reference pipeline's Euler scheduler computes, so the shipped student needs no
  new sampler.
- Pseudo-Huber rather than LCM's elementwise Huber or CM's L2 / LPIPS: iCT found it as good as
  LPIPS without a feature network, and it is insensitive to the few large errors of early targets.
"""

from __future__ import annotations

from itertools import pairwise

import torch

from cadence.distill.student import Condition, Denoiser, _per_sample

EMA_DECAY = 0.95  # LCM's (and CM's CD on its image sets); the target trails the student by ~20 steps
HUBER_SCALE = 0.00054  # iCT's c = 0.00054 sqrt(dim), chosen there for data in [-1, 1] as the reference latents are


def consistency_function(denoiser: Denoiser, model, x: torch.Tensor, sigma: torch.Tensor, condition: Condition):
    """f(x, s) = x - s * v(x, s): the model's x0 prediction; at s = 0 it is x exactly."""
    return denoiser.x0(model, x, sigma, condition)


def implied_noise(x: torch.Tensor, sigma: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """The noise of the trajectory through x: x = (1 - s) x0 + s noise and v = noise - x0 give
    noise = x + (1 - s) v."""
    return x + (1 - _per_sample(sigma, x)) * velocity


@torch.no_grad()
def multistep_sample(
    denoiser: Denoiser, model, noise: torch.Tensor, sigmas: list[float], condition: Condition
) -> torch.Tensor:
    """Deterministic multistep consistency sampling at ``sigmas`` (the reference for the identity
    with ``student.euler``): x <- (1 - s') f(x, s) + s' noise_implied, s' the next sigma, 0 last."""
    x = noise
    for sigma, after in pairwise([*sigmas, 0.0]):
        s = torch.full((x.shape[0],), sigma, device=x.device)
        velocity = denoiser.velocity(model, x, s, condition)
        clean = x - _per_sample(s, x) * velocity
        x = (1 - after) * clean + after * implied_noise(x, s, velocity)
    return x


def pseudo_huber(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean over the batch of sqrt(||a - b||^2 + c^2) - c, c = 0.00054 sqrt(dim) (iCT)."""
    squared = (a - b).flatten(1).square().sum(dim=1)
    c = HUBER_SCALE * a[0].numel() ** 0.5
    return ((squared + c * c).sqrt() - c).mean()


def pair_sigmas(grid: list[float], index: torch.Tensor, skip: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (s_n, s_{n+k}) per sample for grid indices ``index`` (B,), the second clamped at the end (0)."""
    values = torch.tensor(grid, device=index.device)
    return values[index], values[(index + skip).clamp(max=len(grid) - 1)]


@torch.no_grad()
def teacher_target(
    denoiser: Denoiser,
    teacher,
    target,
    x: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    condition: Condition,
    empty: Condition | None,
    guidance_scale: float,
) -> torch.Tensor:
    """f_target(x_{n+k}, s_{n+k}) with x_{n+k} one teacher Euler step with CFG from x at sigma."""
    velocity = denoiser.guided_velocity(teacher, x, sigma, condition, empty, guidance_scale)
    x_next = x + _per_sample(sigma_next - sigma, x) * velocity
    return consistency_function(denoiser, target, x_next, sigma_next, condition)


def consistency_loss(
    denoiser: Denoiser,
    student,
    teacher,
    target,
    x0: torch.Tensor,
    noise: torch.Tensor,
    grid: list[float],
    index: torch.Tensor,
    skip: int,
    condition: Condition,
    empty: Condition | None,
    guidance_scale: float,
) -> torch.Tensor:
    """d(f_student(x_n, s_n), f_target(x_{n+k}, s_{n+k})) for x_n the teacher sample x0 noised to
    grid[index] (per sample); gradients reach the student only."""
    sigma, sigma_next = pair_sigmas(grid, index, skip)
    x = (1 - _per_sample(sigma, x0)) * x0 + _per_sample(sigma, x0) * noise
    wanted = teacher_target(denoiser, teacher, target, x, sigma, sigma_next, condition, empty, guidance_scale)
    return pseudo_huber(consistency_function(denoiser, student, x, sigma, condition), wanted)


@torch.no_grad()
def update_target(target: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """target <- decay * target + (1 - decay) * student, parameters and floating buffers."""
    for mine, theirs in zip(target.state_dict().values(), student.state_dict().values()):
        if mine.is_floating_point():
            mine.lerp_(theirs.to(mine.dtype), 1 - decay)
        else:
            mine.copy_(theirs)
