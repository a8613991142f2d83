"""ODE-pair initialisation: the student regresses the teacher's own trajectories.

The teacher samples with CFG (its Euler sampler, many steps) from fixed noise; each
trajectory is recorded where it crosses the student's K sigmas, and the student learns to map
each recorded point x_{sigma_k} straight to the trajectory's end x0 through its velocity
(x0 = x - sigma_k * v). This is the regression initialisation DMD (Yin et al. 2023,
arXiv 2311.18828) pairs with distribution matching, and that CausVid / DMD2-based video
students use as their first phase; after it the student already runs in K steps, and DMD
corrects what regression averages away.

Differs from the papers: the teacher's grid is the student's sigmas each split into equal
Euler substeps (not the teacher's usual schedule) so that every student sigma is a point of
the trajectory exactly, with no interpolation. The pairs are recorded once, from the run's
seed, and kept in the state folder so a resumed run regresses the same pairs.
"""

from __future__ import annotations

import torch

from cadence.distill.student import (
    Condition,
    Denoiser,
    _per_sample,
    euler,
    refined_grid,
)


def substeps(student_steps: int, teacher_steps: int) -> int:
    """Teacher Euler steps per student step: ``teacher_steps`` rounded to a multiple of K (at least K)."""
    return max(1, round(teacher_steps / student_steps))


def teacher_grid(sigmas: list[float], teacher_steps: int) -> tuple[list[float], list[int]]:
    """The teacher's grid through the student's sigmas to 0; -> (grid, index of each student sigma in it)."""
    return refined_grid(sigmas, substeps(len(sigmas), teacher_steps))


@torch.no_grad()
def record(
    denoiser: Denoiser,
    teacher,
    noise: torch.Tensor,
    sigmas: list[float],
    teacher_steps: int,
    condition: Condition,
    empty: Condition | None,
    guidance_scale: float,
) -> dict[str, torch.Tensor]:
    """-> {"points": (K, B, ...) the trajectory at each student sigma, "x0": (B, ...) its end}."""
    grid, marks = teacher_grid(sigmas, teacher_steps)
    x0, kept = euler(denoiser, teacher, noise, grid, condition, empty, guidance_scale, keep=marks)
    return {"points": torch.stack(kept), "x0": x0}


def regression_loss(
    denoiser: Denoiser,
    student,
    points: torch.Tensor,
    x0: torch.Tensor,
    sigmas: list[float],
    steps: torch.Tensor,
    condition: Condition,
) -> torch.Tensor:
    """mean ||x0_student(x_{sigma_k}) - x0_teacher||^2, one student step k per sample.
    points (K, B, ...), x0 (B, ...), steps (B,) student step indices."""
    batch = torch.arange(x0.shape[0], device=x0.device)
    x = points[steps, batch]
    sigma = torch.tensor(sigmas, device=x0.device)[steps]
    predicted = x - _per_sample(sigma, x) * denoiser.velocity(student, x, sigma, condition)
    return torch.nn.functional.mse_loss(predicted, x0)
