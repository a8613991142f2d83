"""cadence dllm generate | bench | train: diffusion language models from the command line."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cadence.command import command_line


def _quiet() -> None:
    """Keep weight-loading progress bars out of the decoded text."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _device(value: str | None) -> str:
    import torch

    if value is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if value.startswith("cuda") and not torch.cuda.is_available():
        raise click.BadParameter(f"{value!r}: this machine has no CUDA device; use cpu", param_hint="--device")
    if value.split(":")[0] not in ("cpu", "cuda"):
        raise click.BadParameter(f"{value!r} is not a device; valid: cpu, cuda, cuda:N", param_hint="--device")
    return value


@click.group()
def dllm():
    """Masked-diffusion language models: decode, benchmark and train ref-dllm."""


@dllm.command()
@click.option("--model", default="ref-dllm", show_default=True, help="ref-dllm or a checkpoint directory")
@click.option("--prompt", required=True, help="e.g. '12+34=' or 'rev:abcdef='")
@click.option("--recipe", default=None, help="dLLM recipe terms joined by +; default: the family's fast recipe")
@click.option("--gen-length", default=64, show_default=True, type=int, help="tokens to generate")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when there is one)")
def generate(model, prompt, recipe, gen_length, device):
    """Decode one prompt, streaming the canvas as it fills (masked positions shown as _)."""
    import cadence.dllm as dllm_package
    from cadence.dllm.engine import decode_answers
    from cadence.models.llada import dllm_family_of

    device = _device(device)
    _quiet()
    try:
        loaded, tokenizer = dllm_package.load(model, device=device)
        acceleration = dllm_package.accelerate(loaded, recipe or dllm_family_of(loaded).recipe)
    except (ValueError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from None
    steps, forwards = 0, 0
    try:
        stream = dllm_package.decode_steps(loaded, tokenizer, [prompt], gen_length)
        while True:
            try:
                canvas, start = next(stream)
            except StopIteration as end:
                forwards = end.value
                break
            steps += 1
            text = decode_answers(tokenizer, canvas[:, start:].cpu())[0]
            if sys.stdout.isatty():
                click.echo(f"\r{prompt}{text}", nl=False)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    finally:
        acceleration.remove()
    click.echo(f"\r{prompt}{text}" if sys.stdout.isatty() else f"{prompt}{text}")
    click.echo(f"[{forwards} forwards for {gen_length} tokens; recipe: {acceleration.recipe}]", err=True)


@dllm.command()
@click.option("--model", default="ref-dllm", show_default=True, help="ref-dllm or a checkpoint directory")
@click.option("--recipe", "recipes", multiple=True, help="a recipe to score (repeat); plain decoding always runs first")
@click.option("--peers/--no-peers", default=True, show_default=True,
              help="also decode with the model's own loop: diffusers' LLaDA2Pipeline (thresholds 0.9, 0.95, 0.99), "
                   "or DiffusionGemma's generate (its defaults, and entropy_bound=1.0 with 16 steps)")
@click.option("--tasks", default=None, help="comma-separated tasks (default: all)")
@click.option("--prompts", default=32, show_default=True, type=int, help="prompts per task")
@click.option("--gen-length", default=512, show_default=True, type=int)
@click.option("--batch-size", default=1, show_default=True, type=int)
@click.option("--device", default=None)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="directory for rows.json, table.md, frontier.png")
def bench(model, recipes, peers, tasks, prompts, gen_length, batch_size, device, out):
    """Per-task accuracy, tokens/s and speedup of every recipe (and the peers), with the frontier plot."""
    import torch

    import cadence.dllm as dllm_package
    from cadence.dllm.bench import bench as run_bench
    from cadence.dllm.bench import write_report
    from cadence.dllm.card import PLAIN
    from cadence.dllm.gemma import is_diffusion_gemma

    device = _device(device)
    _quiet()
    loaded, tokenizer = dllm_package.load(model, device=device)
    block = getattr(loaded.config, "canvas_length", None) or 32  # DiffusionGemma decodes blocks of its canvas
    plain = PLAIN.format(block=block)
    chosen = list(recipes) or [
        f"semi-ar(block_length={block}) + parallel(threshold=0.9)",
        f"semi-ar(block_length={block}) + parallel(threshold=0.9) + eos-stop",
        f"semi-ar(block_length={block}) + parallel(threshold=0.9) + prefix-cache",
        f"semi-ar(block_length={block}) + parallel(threshold=0.9) + dual-cache",
        f"semi-ar(block_length={block}) + parallel(threshold=0.9) + dual-cache + eos-stop",
        f"semi-ar(block_length={block}) + entropy-bounded(bound=0.1) + dual-cache + eos-stop",
    ]
    if peers and is_diffusion_gemma(loaded):  # generate's defaults, and a setting that accepts more a step
        chosen += ["peer:diffusion-gemma()", "peer:diffusion-gemma(entropy_bound=1.0, max_denoising_steps=16)"]
    elif peers:
        chosen += [f"peer:llada2(threshold={t})" for t in (0.9, 0.95, 0.99)]
    try:
        rows = run_bench(loaded, tokenizer, chosen, tasks=tasks.split(",") if tasks else None,
                         prompts_per_task=prompts, gen_length=gen_length, batch_size=batch_size,
                         reference=plain)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    if out is not None:
        meta = {"command": command_line("dllm"), "device": str(
            torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"), "torch": torch.__version__}
        write_report(rows, out, meta)
        click.echo(f"wrote {out}/table.md, rows.json, frontier.png")


@dllm.command()
@click.option("--size", default="ref-dllm", show_default=True, help="a LLaDA size: ref-dllm, tiny")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="checkpoint directory (resumed if it holds train_state.pt)")
@click.option("--seconds", default=420.0, show_default=True, type=float, help="total training time budget")
@click.option("--device", default=None)
@click.option("--gen-length", default=512, show_default=True, type=int)
@click.option("--block-length", default=32, show_default=True, type=int)
@click.option("--batch", default=64, show_default=True, type=int)
@click.option("--lr", default=1e-3, show_default=True, type=float)
@click.option("--tasks", default=None, help="comma-separated tasks (default: all)")
@click.option("--save-every", default=60.0, show_default=True, type=float, help="seconds between checkpoints")
@click.option("--card-prompts", default=64, show_default=True, type=int, help="prompts per task for the card; 0: no card")
@click.option("--state", type=click.Path(path_type=Path), default=None,
              help="where the optimizer state for resuming goes (default: OUT/train_state.pt)")
@click.option("--init", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="start from this checkpoint's weights (a fresh optimizer): training continued on another machine")
def train(size, out, seconds, device, gen_length, block_length, batch, lr, tasks, save_every, card_prompts, state,
          init):
    """Train a LLaDA-architecture dLLM on the synthetic tasks; resumable; writes a card."""
    import cadence.dllm as dllm_package
    from cadence.dllm.card import write_card
    from cadence.dllm.tasks import TASKS
    from cadence.dllm.train import TrainConfig
    from cadence.dllm.train import train as run_train

    device = _device(device)
    try:
        config = TrainConfig(size=size, gen_length=gen_length, block_length=block_length, batch=batch, lr=lr,
                             seconds=seconds, tasks=tuple(tasks.split(",")) if tasks else tuple(TASKS))
        summary = run_train(config, out, device=device, save_every=save_every, log=click.echo, state=state, init=init)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"{summary['steps']} steps in {summary['seconds']} s, final loss {summary['final_loss']}")
    if card_prompts:
        model, tokenizer = dllm_package.load(out, device=device)
        card = write_card(Path(out), model, tokenizer, summary, command_line("dllm"),
                          prompts_per_task=card_prompts)
        click.echo("plain decoding accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in card["accuracy"].items()))
