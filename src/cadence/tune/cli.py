"""``cadence tune``: the command (registered in cadence.cli's PACKAGE_COMMANDS)."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import click

from cadence.cli import _check_model, _check_size, _device, _fail, _quiet, _size_options
from cadence.command import command_line

# `cadence recipes --model DIR` shows a recipe saved under this name beside a checkpoint
# (models/defaults.py reads it).
from cadence.models.defaults import TUNED_RECIPE


def _names(value: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in value.split(",") if name.strip()) if value else ()


@click.command()
@click.option("--model", required=True, help="ref-video, ref-image, or a local diffusers checkpoint dir")
@click.option("--min-psnr", type=float, default=35.0, show_default=True, help="PSNR bar (dB) against the baseline")
@click.option("--min-ssim", type=float, default=None, help="SSIM bar against the baseline (optional)")
@click.option("--min-adherence", type=float, default=None, help="judge adherence bar (needs cadence.judge)")
@click.option("--prompts", default="heldout", show_default=True,
              help="'heldout' (the reference models' held-out captions) or a file with one prompt per line; its "
                   "last quarter is kept for the held-out check")
@click.option("--limit", "tuning", type=int, default=4, show_default=True, help="tuning prompts")
@click.option("--confirm-prompts", "confirm", type=int, default=2, show_default=True,
              help="prompts the fastest candidates are confirmed on before one is chosen (0: the tuning ones again)")
@click.option("--check-prompts", "check", type=int, default=2, show_default=True,
              help="held-out check prompts (never used for tuning)")
@click.option("--seeds", type=int, default=2, show_default=True,
              help="seeds 0..S-1 per tuning prompt; the check uses seeds S..2S-1")
@click.option("--steps", type=int, default=50, show_default=True)
@click.option("--guidance-scale", type=float, default=4.0, show_default=True)
@_size_options
@click.option("--device", default=None, callback=_device, help="cpu or cuda (default: cuda when available)")
@click.option("--time-budget", default="15m", show_default=True, help="for the whole run, e.g. 15m, 90s, 1h")
@click.option("--trials", type=int, default=None, help="at most this many candidates (default: until the budget ends)")
@click.option("--include", default="", help="comma-separated techniques: search only these (peers may be named)")
@click.option("--exclude", default="", help="comma-separated techniques to leave out")
@click.option("--compile/--no-compile", "compile_blocks", default=None,
              help="try compile on the fastest candidates at the confirmation (default: on CUDA only; it is never "
                   "searched: it changes speed, not the output)")
@click.option("--speed-at", "speed_at", default=None,
              help="rank candidates by their speed modelled at a real size (e.g. wan2.1-1.3b, flux.1-dev) from "
                   "per-step times measured there on this device; quality is still measured on --model")
@click.option("--embeddings", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="precomputed prompt embeddings (reference models, a machine without their text encoder): the "
                   "tuning, confirmation, check and calibration prompts (benchmarks/README.md says how to make them)")
@click.option("--save-default", is_flag=True,
              help=f"save the chosen recipe beside the checkpoint ({TUNED_RECIPE}): its default from then on")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="recipe.txt, recipe.toml, report.md, frontier.png, study.db (resumable) go here")
def tune(model, min_psnr, min_ssim, min_adherence, prompts, tuning, confirm, check, seeds, steps, guidance_scale, height,
         width, frames, device, time_budget, trials, include, exclude, compile_blocks, speed_at, embeddings, save_default,
         out):
    """Search the fastest recipe that meets a quality bar on your model and device."""
    _quiet()
    import cadence
    from cadence.bench.runner import check_writable
    from cadence.loading import reference_of
    from cadence.reference.models import REFERENCE_MODELS
    from cadence.tune.search import TuneRefused
    from cadence.tune.search import tune as run_tune
    from cadence.tune.settings import TuneSettings, parse_duration

    try:
        settings = TuneSettings(
            out=out, min_psnr=min_psnr, min_ssim=min_ssim, min_adherence=min_adherence, prompts=prompts,
            tuning_prompts=tuning, confirm_prompts=confirm, check_prompts=check, seeds=seeds, steps=steps, guidance_scale=guidance_scale,
            device=device, time_budget=parse_duration(time_budget), trials=trials, include=_names(include),
            exclude=_names(exclude), compile=compile_blocks, height=height, width=width, frames=frames, model=model,
            command=command_line(), speed_at=speed_at)
        settings.check()
        if prompts == "heldout" and reference_of(model) is None:
            raise ValueError(f"--prompts heldout: the held-out captions are the reference models' own (and their "
                             f"shipped students'); for {model!r} give a text file with one prompt per line")
        if save_default and model in REFERENCE_MODELS:
            raise ValueError(f"--save-default: {model} keeps the shipped defaults (`cadence recipes --model {model}`); "
                             "save a tuned recipe beside your own checkpoint directory")
        if speed_at is not None and model in REFERENCE_MODELS:  # a reference model's family is known before loading
            from cadence.reference.models import reference_model
            from cadence.tune.realsize import check_family

            try:
                check_family(speed_at, reference_model(model).transformer_cls)
            except TypeError as error:
                raise ValueError(str(error)) from None
        _check_size(model, height, width, frames)
        _check_model(model)
        check_writable(out)
        pipe = cadence.load(model, device=device, text_encoder=embeddings is None)
        if embeddings is not None:
            from cadence.reference.text import load_prompt_embeddings

            pipe.prompt_cache = load_prompt_embeddings(embeddings)
        result = run_tune(pipe, settings)
    except TuneRefused as error:
        _fail(error)
    except (ValueError, FileNotFoundError, FloatingPointError) as error:
        _fail(error)
    best = result.best
    confirmed = best["confirmation"]
    modelled = f" modelled at {speed_at}" if speed_at else ""
    click.echo(f"chosen: {result.recipe}  ({1 / best['relative_time']:.2f}x speedup{modelled} on the tuning cases, "
               f"{', '.join(f'{k} {v:.2f}' for k, v in best['quality'].items())}; confirmed at "
               f"{confirmed['speedup']:.2f}x, {', '.join(f'{k} {v:.2f}' for k, v in confirmed['quality'].items())})")
    if result.check is not None:
        for name, entry in result.check["recipes"].items():
            speed = f"{entry['speedup']:.2f}x" if entry["speedup"] else f"failed: {entry['failed']}"
            measured = ", ".join(f"{k} {v:.2f}" for k, v in (entry["quality"] or {}).items())
            click.echo(f"held-out check, {name}: {entry['recipe']}: {speed}, {measured}")
    if save_default:
        saved = Path(model) / TUNED_RECIPE
        saved.write_text(f"# tuned by cadence tune on {date.today().isoformat()}: {1 / best['relative_time']:.2f}x on "
                         f"the tuning cases at {', '.join(f'{k} {v:.2f}' for k, v in best['quality'].items())}; "
                         f"report: {(out / 'report.md').resolve()}\n{result.recipe.to_toml()}")
        click.echo(f"saved {saved}: this checkpoint's default recipe (`cadence recipes --model {model}`)")
    click.echo(f"wrote {out}/recipe.txt, recipe.toml, report.md, frontier.png, check.json, study.db")
