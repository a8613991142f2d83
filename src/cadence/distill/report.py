"""What a distillation run writes for people: loss curves, the sample grid, the card."""

from __future__ import annotations

from pathlib import Path

import torch

TITLES = {
    "ode": "ODE-pair regression",
    "generator": "DMD generator",
    "critic": "critic (flow matching)",
    "consistency": "consistency (pseudo-Huber)",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(history: list[dict], evaluations: list[dict], path: Path) -> None:
    """One panel per loss (ODE regression, DMD generator, critic, consistency) and the evaluations:
    the judge's scores, or for a Wan or FLUX student its PSNR against the teacher's samples."""
    plt = _pyplot()
    series = {key: [(h["step"], h[key]) for h in history if key in h] for key in TITLES}
    series = {key: points for key, points in series.items() if points}
    panels = len(series) + bool(evaluations)
    fig, axes = plt.subplots(1, max(panels, 1), figsize=(4 * max(panels, 1), 3.2), squeeze=False)
    for ax, (key, points) in zip(axes[0], series.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, lw=0.8)
        causal = key == "generator" and any(h.get("phase") == "self-forcing" for h in history)
        ax.set_title(TITLES[key] + (" (on the student's own rollouts)" if causal else ""), fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if evaluations and "psnr" in evaluations[0]:
        ax = axes[0][-1]
        ax.plot([e["step"] for e in evaluations], [e["psnr"] for e in evaluations], "o-")
        ax.set_xlabel("step")
        ax.set_ylabel("dB")
        ax.set_title("PSNR vs the teacher's samples (held-out prompts)", fontsize=9)
    elif evaluations:
        ax = axes[0][-1]
        ax.plot([e["step"] for e in evaluations], [e["adherence"] for e in evaluations], "o-", label="adherence")
        ax.set_xlabel("step")
        ax.set_title("judge on held-out captions", fontsize=9)
        fds = [(e["step"], e["fd"]) for e in evaluations if e.get("fd") is not None]
        if fds:
            twin = ax.twinx()
            twin.plot(*zip(*fds), "s--", color="tab:red", label="FD")
            twin.set_ylabel("FD", color="tab:red")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _frames(clip: torch.Tensor) -> list[torch.Tensor]:
    """A video's first, middle and last frames; an image itself. Each (3, H, W)."""
    if clip.dim() == 3:
        return [clip]
    return [clip[0], clip[clip.shape[0] // 2], clip[-1]]


def plot_samples(
    teacher: torch.Tensor, student: torch.Tensor, labels: list[str], settings, path: Path, guidance: str | None = None
) -> None:
    """Rows: conditions; columns: the teacher's frames, then the student's (same noise). ``guidance``:
    how the teacher was guided when not by CFG at ``settings.guidance_scale`` (FLUX)."""
    plt = _pyplot()
    per = len(_frames(teacher[0]))
    fig, axes = plt.subplots(len(labels), 2 * per, figsize=(1.4 * 2 * per + 2.6, 1.4 * len(labels)), squeeze=False)
    for row, label in enumerate(labels):
        for side, clips in enumerate((teacher, student)):
            for col, frame in enumerate(_frames(clips[row])):
                ax = axes[row][side * per + col]
                ax.imshow(((frame.permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy(), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0 and col == 0:
                    ax.set_title(
                        f"teacher, {settings.sample_steps} steps, {guidance or f'CFG {settings.guidance_scale:g}'}"
                        if side == 0
                        else f"student, {settings.steps} steps",
                        fontsize=7,
                        loc="left",
                    )
        axes[row][0].set_ylabel(
            label.replace(" over ", "\nover ").replace(" and ", "\nand "),
            fontsize=6,
            rotation=0,
            ha="right",
            va="center",
        )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def method_line(settings: dict) -> str:
    """The method and its settings, in one sentence of the card."""
    if settings["method"] == "self-forcing":
        return (
            f"Self-Forcing (DMD on the student's own chunk-by-chunk rollouts, chunks of {settings['chunk_frames']} "
            f"latent frames, gradient through one random exit step; critic from the teacher, "
            f"{settings['critic_updates']} critic updates per generator step, no GAN head)"
        )
    if settings["method"] == "consistency":
        return (
            f"consistency distillation (CD / LCM on the teacher's CFG ODE: EMA target decay {settings['ema_decay']:g}, "
            f"pairs {settings['skip']} teacher grid interval(s) apart, pseudo-Huber distance)"
        )
    return (
        f"DMD2 (critic from the teacher, {settings['critic_updates']} critic updates per generator step, no GAN head)"
    )


def fidelity_lines(summary: dict) -> str:
    """A Wan or FLUX student's evaluation in the card: not the judge's, PSNR/SSIM to its teacher."""
    last = summary["evaluations"][-1] if summary["evaluations"] else None
    settings = summary["settings"]
    lines = "- Adherence and FD are not measured: the judge scores the procedural world of the reference models only.\n"
    if last:
        lines += (
            f"- Against the teacher's samples ({settings['sample_steps']} steps, {teacher_guidance(summary)}) on "
            f"{settings['eval_prompts']} held-out prompts, same noise, at step {last['step']}: PSNR "
            f"{last['psnr']:.2f} dB, SSIM {last['ssim']:.4f} (the student's bf16 weights as shipped).\n"
        )
    held = summary.get("heldout_prompts") or []
    lines += (
        f"- Held out from training, for the evaluation and samples.png: {len(held)} prompts of the prompts file, "
        f"chosen by a permutation seeded with the run's seed ({settings['seed']}): "
        + "; ".join(f"`{prompt}`" for prompt in held)
        + ".\n"
    )
    return lines + "- Not evaluated (evaluation off).\n" * (last is None)


def outside_cadence(summary: dict) -> str:
    """How a Wan or FLUX student runs at its own sigmas without cadence.load (which sets them)."""
    sigmas = "[" + ", ".join(f"{s:.6f}" for s in summary["sigmas"]) + "]"
    if summary.get("family") == "flux":
        return (
            f"In plain diffusers: `FluxPipeline.from_pretrained(<this folder>)(prompt, num_inference_steps="
            f"{summary['steps']}, sigmas={sigmas}, guidance_scale={summary['guidance_scale']:g})`.\n"
        )
    return (
        "In plain diffusers, WanPipeline takes no sigmas and its scheduler would spread its own: load it with "
        f"`cadence.load`, or set `pipe.scheduler.set_timesteps(sigmas={sigmas})` in your own loop.\n"
    )


def teacher_guidance(summary: dict) -> str:
    """How the teacher was guided: CFG, or FLUX.1-dev's embedded guidance (one forward, no CFG)."""
    if summary.get("family") == "flux":  # FLUX.1-dev embeds its guidance; a FLUX without the embedding runs without
        embedded = summary["guidance_scale"] != 1.0
        return f"embedded guidance {summary['guidance_scale']:g}, no CFG" if embedded else "no CFG"
    return f"CFG {summary['teacher_guidance_scale']:g}"


def card(summary: dict) -> str:
    if summary.get("family") in ("wan", "flux"):
        return _card(summary, fidelity_lines(summary))
    last = summary["evaluations"][-1] if summary["evaluations"] else None
    fd = "" if last is None or last.get("fd") is None else f", FD {last['fd']:.2f}"
    judged = (
        f"- Judge on held-out captions at step {last['step']}: adherence {last['adherence']:.3f}{fd} "
        "(the student's bf16 weights as shipped in `transformer/`).\n"
        if last
        else "- Not judged (no held-out captions, or evaluation off).\n"
    )
    teacher = summary.get("teacher_evaluation")
    if teacher:
        teacher_fd = "" if teacher.get("fd") is None else f", FD {teacher['fd']:.2f}"
        judged += (
            f"- The teacher on the same captions and noise ({teacher['steps']} steps, CFG "
            f"{teacher['guidance_scale']:g}): adherence {teacher['adherence']:.3f}{teacher_fd}.\n"
        )
    return _card(summary, judged)


def _card(summary: dict, judged: str) -> str:
    settings = summary["settings"]
    flux_note = (
        "; FLUX.1-dev is guidance-distilled, so DMD's teacher with CFG is the teacher at its guidance"
        if summary.get("family") == "flux" and summary["guidance_scale"] != 1.0
        else ""
    )
    sigmas = ", ".join(f"{s:.4f}" for s in summary["sigmas"])
    if summary.get("causal"):
        use = f"""A causal, chunk-wise student made by `cadence distill --method self-forcing`: it streams chunks of
{summary["chunk_frames"]} latent frames, each in {summary["steps"]} transformer forwards (one per step, no CFG) at the
sigmas {sigmas}, attending to the clean chunks before it through the stream's KV cache:
`cadence stream --model <this folder> --frames-per-chunk {summary["chunk_frames"]} --steps-per-chunk {summary["steps"]}`
(`cadence.stream` takes the sigmas from the student). A plain pipeline call runs it bidirectionally, which
is not how it was trained.
"""
    else:
        guidance = summary["guidance_scale"]
        embedded = f" (FLUX's embedded guidance {guidance:g}, kept from its teacher)" if guidance != 1 else ""
        use = f"""A few-step student made by `cadence distill`: it generates in {summary["steps"]} transformer forwards
(one per step, no CFG) at the sigmas {sigmas}.
`cadence.load` opens this folder with those steps, sigmas and guidance {guidance:g}{embedded} as its defaults.
"""
        if summary.get("family") in ("wan", "flux"):
            use += outside_cadence(summary)
    return f"""# {summary["steps"]}-step student of {summary["teacher"]} ({summary["method"]})

{use}
## Training
- Teacher: `{summary["teacher"]}` with {teacher_guidance(summary)} (the student distils it to one
  forward a step without CFG{flux_note}).
- Method: `{summary["method"]}`, {method_line(settings)}.
- {summary["ode_steps"]} steps of ODE-pair regression ({settings["ode_pairs"]} teacher trajectories of
  {settings["teacher_steps"]} Euler steps), then the method: {summary["steps_trained"]} steps in all, batch
  {settings["batch_size"]}, in {summary["seconds"]} s on {summary["device"]} (torch {summary["torch"]}, {summary["date"]}).
- Command: `{summary["command"]}`
{judged}
![losses](loss.png)

## Samples
The teacher at {settings["sample_steps"]} steps with {teacher_guidance(summary)} beside the student (its bf16
weights as shipped in `transformer/`{", chunk by chunk as it streams" if summary.get("causal") else ""}), same conditions and noise.

![samples](samples.png)

`state/` holds what a resumed run needs (student, the critic or EMA target, optimizers, RNG states):
delete it before shipping the student.
"""
