"""DMD2: distribution matching distillation (Yin et al. 2024, "Improved Distribution Matching
Distillation for Fast Image Synthesis", arXiv 2405.14867), on rectified-flow teachers.

The generator (the student) is pushed along the difference of two scores of its own samples
x0, diffused to a random noise level t: the real score, the frozen teacher with CFG, and the
fake score, a critic initialised from the teacher and trained with the flow-matching loss on
the student's samples (``critic_updates`` critic steps per generator step: DMD2's two
time-scale update rule). In x0 terms (DMD eq. 7 with the DMD2 code's normaliser):

    g = (fake_x0(x_t) - real_x0(x_t)) / mean|x0 - real_x0(x_t)|,
    loss = 0.5 * ||x0 - stopgrad(x0 - g)||^2,   so d loss / d x0 = g (per element, / numel).

Where this differs from the paper, and why:
- No GAN head (DMD2's classifier on the critic's features): optional in the paper, left out
  here; the generator loss is the distribution-matching term alone.
- No regression loss during DMD (DMD2 drops DMD1's paired-data loss too); the ODE-pair phase
  (``ode_pairs.py``) is a separate initialisation before DMD instead.
- Backward simulation uses the student's deterministic Euler chain (the reference pipeline's
  scheduler step), not DMD2's re-noising of the x0 prediction with fresh noise, so the input
  of the step being trained is exactly what the shipped pipeline feeds the student.
- t ~ U(0.02, 0.98) as DMD2 draws timesteps in [0.02 T, 0.98 T]; the critic learns at noise
  levels ~ U(0, 1), as DMD2's fake-score loss draws them over all of [0, T), so it is fitted
  wherever the generator loss queries it (the teacher's logit-normal would leave the ends thin).
- The critic regresses the velocity (the teacher's flow-matching target) where DMD2's regresses
  the noise (its SD teachers' epsilon target): each critic keeps its teacher's parameterisation.
- The normaliser is clamped at 1e-12: where x0 equals the real x0 exactly the paper's ratio is
  0 / 0.
"""

from __future__ import annotations

import torch

from cadence.distill.student import Condition, Denoiser, _per_sample, euler, full

DMD_SIGMA_RANGE = (0.02, 0.98)


def backward_simulation(
    denoiser: Denoiser, student, noise: torch.Tensor, sigmas: list[float], step: int, condition: Condition
) -> torch.Tensor:
    """The student's own chain from noise, without grad, to the input of step ``step`` (DMD2
    section 4.5: train on what the student will see, not on noised real data)."""
    with torch.no_grad():
        x, _ = euler(denoiser, student, noise, [*sigmas[: step + 1]], condition)
    return x


def dmd_gradient(x0: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """g = (fake - real) / mean|x0 - real| per sample (DMD2's normaliser)."""
    dims = tuple(range(1, x0.dim()))
    scale = (x0 - real_x0).abs().mean(dim=dims, keepdim=True).clamp_min(1e-12)
    return (fake_x0 - real_x0) / scale


def generator_loss(
    denoiser: Denoiser,
    teacher,
    critic,
    x0: torch.Tensor,
    condition: Condition,
    empty: Condition | None,
    guidance_scale: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """0.5 * mean (x0 - stopgrad(x0 - g))^2 at one random noise level per sample; gradients
    reach the student through x0 only (teacher and critic run without grad)."""
    batch = x0.shape[0]
    low, high = DMD_SIGMA_RANGE
    t = low + (high - low) * torch.rand(batch, generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    with torch.no_grad():
        x_t = (1 - _per_sample(t, x0)) * x0 + _per_sample(t, x0) * noise
        real_x0 = x_t - _per_sample(t, x0) * denoiser.guided_velocity(teacher, x_t, t, condition, empty, guidance_scale)
        fake_x0 = denoiser.x0(critic, x_t, t, condition)
        gradient = dmd_gradient(x0, real_x0, fake_x0)
    return 0.5 * torch.nn.functional.mse_loss(x0, (x0 - gradient).detach())


def critic_loss(
    denoiser: Denoiser, critic, x0: torch.Tensor, condition: Condition, generator: torch.Generator
) -> torch.Tensor:
    """The flow-matching loss of the fake score on the student's samples (detached: no grad
    into the student), at noise levels ~ U(0, 1)."""
    x0 = x0.detach()
    sigma = torch.rand(x0.shape[0], generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    noisy = (1 - _per_sample(sigma, x0)) * x0 + _per_sample(sigma, x0) * noise
    return torch.nn.functional.mse_loss(denoiser.velocity(critic, noisy, sigma, condition), noise - x0)


def student_sample(
    denoiser: Denoiser, student, noise: torch.Tensor, sigmas: list[float], step: int, condition: Condition
) -> torch.Tensor:
    """The student's x0 prediction at step ``step`` of its chain from ``noise``, with grad
    through the last forward only."""
    x = backward_simulation(denoiser, student, noise, sigmas, step, condition)
    return denoiser.x0(student, x, full(x.shape[0], sigmas[step], x.device), condition)
