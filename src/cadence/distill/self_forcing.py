"""Self-Forcing (Huang et al. 2025, "Self Forcing: Bridging the Train-Test Gap in Autoregressive
Video Diffusion", arXiv 2506.08009) after CausVid's ODE initialisation (Yin et al. 2025, "From
Slow Bidirectional to Fast Autoregressive Video Diffusion Models", arXiv 2412.07772): a causal,
chunk-wise few-step student of a bidirectional video teacher, trained on the stream's own loop.

Two phases, each a loss the trainer (``trainer.py``) steps:

1. ``regression_loss`` (ODE pairs, ``ode_pairs.py``'s recorded teacher trajectories): the
   student, block-causal (:mod:`cadence.distill.causal`), sees every chunk c of a trajectory at its
   own noise level sigma_{k_c} (independent per chunk, from the student's K-step grid) with the
   clean ends of chunks < c as context, and regresses each chunk's end x0.
2. ``student_sample`` + DMD (``dmd.py``): the student generates the clip as the stream does, chunk
   by chunk with its own clean past as context; every chunk stops at one random exit step s
   (one per batch) and its x0 prediction there is its output. The rollout runs without grad;
   one block-causal forward over [outputs of chunks 0..n-2, each chunk's input at step s] then
   gives every chunk's exit output again with grad (teacher forcing on the student's own past:
   the same numbers, ``causal.py``). DMD's generator loss (teacher with CFG as the real score,
   the critic as the fake one) runs on the whole clip; the critic learns on the same rollouts.

Where this differs from the papers, and why:
- ODE phase context: CausVid regresses with noisy earlier chunks as context (diffusion forcing,
  every chunk noisy at its own level); here the context is the teacher's clean chunk ends at
  timestep 0, which is what the stream feeds the student (its cache holds clean chunks), so the
  regression trains the inference form from the first step.
- Steps: deterministic Euler over the student's sigmas, as the stream's scheduler steps (and
  ``dmd.backward_simulation``); Self-Forcing re-noises each x0 prediction with fresh noise between
  steps (its few-step sampler), which the stream here does not do.
- Gradient: through every chunk's exit forward, including the recomputed context (the student's
  weights shape the context's keys and values in that forward too); Self-Forcing fills its cache
  under no_grad, so its gradient stops at the cache. As in the paper, the exit step's input and
  the generated past are detached.
- One exit step per rollout for all chunks: Self-Forcing's default (``same_step_across_blocks``).
  Self-Forcing may narrow DMD's noise level by the exit step (``ts_schedule``); here it is
  ``dmd.py``'s U(0.02, 0.98) at every exit. No clip longer than the teacher's (16 frames, every one scored; Self-Forcing
  rolls out up to 21 and more), no rolling cache in training, no GAN head (``dmd.py``).
"""

from __future__ import annotations

import torch

from cadence.distill.causal import BlockCausal
from cadence.distill.student import Condition


def check_chunks(frames: int, chunk_frames: int) -> int:
    """The chunks of a clip of ``frames`` latent frames; refused unless ``chunk_frames`` (an int >= 1:
    ``DistillSettings`` checks it) divides them."""
    if frames % chunk_frames:
        divisors = [d for d in range(1, frames + 1) if frames % d == 0]
        raise ValueError(
            f"chunk_frames={chunk_frames} does not divide the clip's {frames} latent frames; valid: "
            f"{', '.join(map(str, divisors))}"
        )
    return frames // chunk_frames


def regression_loss(
    causal: BlockCausal,
    points: torch.Tensor,
    x0: torch.Tensor,
    sigmas: list[float],
    steps: torch.Tensor,
    condition: Condition,
) -> torch.Tensor:
    """mean ||x0_student - x0_teacher||^2 over the clip, chunk c of sample b at the student step
    ``steps[b, c]``. points (K, B, C, T, H, W): the teacher's trajectory at the student's sigmas;
    x0 (B, C, T, H, W): its end; steps (B, chunks)."""
    frames = causal.chunk_frames
    batch = torch.arange(x0.shape[0], device=x0.device)
    noisy = torch.cat(
        [points[steps[:, c], batch][:, :, c * frames : (c + 1) * frames] for c in range(steps.shape[1])], dim=2
    )
    sigma = torch.tensor(sigmas, device=x0.device)[steps]  # (B, chunks)
    context = x0[:, :, : x0.shape[2] - frames]  # chunks 0..n-2: the last is no chunk's context
    predicted = causal.x0(noisy, sigma, condition.tokens, clean=context)
    return torch.nn.functional.mse_loss(predicted, x0)


def student_sample(
    causal: BlockCausal, noise: torch.Tensor, sigmas: list[float], exit_step: int, condition: Condition
) -> torch.Tensor:
    """The student's clip from ``noise`` (B, C, T, H, W), every chunk stopped at ``exit_step``,
    with grad through each chunk's exit forward (its input and its context detached)."""
    with torch.no_grad():
        clip, inputs = causal.rollout(noise, sigmas, condition.tokens, exit_step)
    if not torch.is_grad_enabled():
        return clip
    chunks = noise.shape[2] // causal.chunk_frames
    sigma = torch.full((noise.shape[0], chunks), sigmas[exit_step], device=noise.device)
    context = clip[:, :, : clip.shape[2] - causal.chunk_frames]
    return causal.x0(inputs, sigma, condition.tokens, clean=context)


def generate(causal: BlockCausal, noise: torch.Tensor, sigmas: list[float], condition: Condition) -> torch.Tensor:
    """The clip the stream makes from this noise: every chunk through all of its steps."""
    with torch.no_grad():
        clip, _ = causal.rollout(noise, sigmas, condition.tokens)
    return clip
