"""cadence generate | bench | train | distill | calibrate | quantize | recipes | demo"""

from __future__ import annotations

import os
from pathlib import Path

import click

# The simplest policy, needing no calibration, so the demo runs on any checkout; its speed and
# fidelity on ref-video: benchmarks/RESULTS.md, "Caching policies and diffusers' hooks on the
# reference models".
DEMO_RECIPE = "fixed-interval(interval=2)"


def _quiet():
    """Keep library chatter (weight-loading reports) out of the user's terminal."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from diffusers.utils import logging as diffusers_logging

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()


def _fail(error: Exception):
    raise click.ClickException(str(error)) from None


def _recipes(values: tuple[str, ...]):
    from cadence.recipe import Recipe

    try:
        return [Recipe.parse(value) for value in values]
    except ValueError as error:
        _fail(error)


def _model_choice():
    from cadence.reference.models import REFERENCE_MODELS

    return click.Choice(list(REFERENCE_MODELS))


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _device(ctx, param, value: str | None) -> str:
    """--device: checked before any model loads; default cuda when there is one."""
    import torch

    if value is None:
        return _default_device()
    try:
        device = torch.device(value)
    except RuntimeError:
        raise click.BadParameter(f"{value!r} is not a device; valid: cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter(f"{value!r}: this machine has no CUDA device; use cpu")
    if device.type not in ("cpu", "cuda"):
        raise click.BadParameter(f"{value!r}: cadence runs on cpu or cuda")
    return value


# What --out takes: write_video writes a GIF, an MP4 through ffmpeg, or an (animated) PNG.
OUT_SUFFIXES = (".gif", ".mp4", ".png")


def _check_out(out: Path) -> None:
    """--out of generate: a format cadence writes, known before any work starts."""
    import importlib.util

    if out.suffix.lower() not in OUT_SUFFIXES:
        found = f"not {out.suffix!r}" if out.suffix else "and it has no extension"
        raise ValueError(f"--out {str(out)!r}: cadence writes {', '.join(OUT_SUFFIXES)} files, {found}")
    if out.suffix.lower() == ".mp4" and importlib.util.find_spec("imageio_ffmpeg") is None:
        raise ValueError(f"--out {str(out)!r}: writing MP4 needs ffmpeg (pip install 'imageio[ffmpeg]'); "
                         "or write a .gif")


def _check_model(model: str) -> None:
    """--model: a reference model's name or a diffusers checkpoint directory, before loading."""
    from cadence.reference.models import REFERENCE_MODELS, STUDENTS

    if model not in REFERENCE_MODELS and model not in STUDENTS and not Path(model).is_dir():
        raise ValueError(f"unknown model {model!r}; valid: {', '.join(map(repr, [*REFERENCE_MODELS, *STUDENTS]))}, "
                         "or a local diffusers checkpoint directory")


DLLM = "ref-dllm"


def _is_dllm(model: str) -> bool:
    """ref-dllm, or a transformers checkpoint directory (a config.json that no diffusers class
    wrote, no model_index.json): decoded by ``cadence dllm``, to which ``generate`` and
    ``bench`` hand it."""
    import json

    folder = Path(model)
    if model == DLLM:
        return True
    if not (folder / "config.json").is_file() or (folder / "model_index.json").is_file():
        return False
    try:
        return "_class_name" not in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False


def _dllm_options(ctx: click.Context, takes: tuple[str, ...]) -> None:
    """Refuse options given that mean nothing to a diffusion LM, naming them and the ones it takes."""
    flag = {param.name: param.opts[0] for param in ctx.command.params}
    given = [flag[name] for name in ctx.params if name not in takes and
             ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
    if given:
        valid = ", ".join(flag[name] for name in takes)
        _fail(ValueError(f"{', '.join(given)}: not an option for a diffusion LM ({ctx.params['model']}); it takes "
                         f"{valid}"))


def _video_options(ctx: click.Context) -> None:
    """Refuse --gen-length given for a diffusion transformer (it is a diffusion LM's option)."""
    if ctx.get_parameter_source("gen_length") == click.core.ParameterSource.COMMANDLINE:
        _fail(ValueError(f"--gen-length: an option for diffusion LMs (ref-dllm); {ctx.params['model']} generates "
                         "videos or images: use --steps, --height, --width, --frames"))


def _check_size(model: str, height, width, frames) -> None:
    """--height/--width/--frames: what can be refused before the model loads."""
    from cadence import generation
    from cadence.reference.models import REFERENCE_MODELS

    for option, value in (("--height", height), ("--width", width), ("--frames", frames)):
        if value is not None and value <= 0:
            raise ValueError(f"{option} {value} must be a positive integer")
    if frames is not None and model in REFERENCE_MODELS and REFERENCE_MODELS[model].task == "image":
        raise ValueError(f"--frames {frames}: {model} makes images; it takes no frame count")
    generation.check_size_values(height, width, frames)


def _size_options(command):
    """--height, --width, --frames: default the checkpoint's own size."""
    for name, what in (("frames", "frame count (video models)"), ("width", "width in pixels"),
                       ("height", "height in pixels")):
        command = click.option(f"--{name}", type=int, default=None,
                               help=f"{what}; default: the checkpoint's own")(command)
    return command


def _write_atomically(out: Path, output) -> Path:
    """Write the clip under a temporary name and rename it: an interrupted write leaves no
    half-written file under the name asked for."""
    from cadence.bench.report import write_video

    partial = out.with_name(f".{out.stem}.partial{out.suffix}")
    try:
        written = write_video(partial, output if output.dim() == 4 else output[None])
        final = out.with_suffix(written.suffix)  # an MP4 that ffmpeg failed to write falls back to a GIF
        os.replace(written, final)
    finally:
        partial.unlink(missing_ok=True)
        partial.with_suffix(".gif").unlink(missing_ok=True)
    return final


# Commands that live beside their own package (serve, tune, judge, ...), so cli.py stays thin:
# name -> "module:attribute" of a click command, imported only when that command runs or
# the command list is printed.
PACKAGE_COMMANDS: dict[str, str] = {
    "serve": "cadence.serve.cli:serve",
    "judge": "cadence.judge.cli:judge",
    "prompts": "cadence.judge.cli:prompts",
    "tune": "cadence.tune.cli:tune",
    "dllm": "cadence.dllm.cli:dllm",
    "distill": "cadence.distill.cli:distill",
    "stream": "cadence.stream.cli:stream",
}


class _Commands(click.Group):
    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), *PACKAGE_COMMANDS})

    def get_command(self, ctx, name):
        if name in PACKAGE_COMMANDS:
            import importlib

            module, attribute = PACKAGE_COMMANDS[name].split(":")
            return getattr(importlib.import_module(module), attribute)
        return super().get_command(ctx, name)


@click.group(cls=_Commands)
@click.version_option(package_name="cadence")
def main():
    """cadence: make diffusion transformers generate several times faster, with the
    quality loss measured and bounded."""


@main.command()
@click.option("--model", "model", default="ref-video", show_default=True, help="ref-video, ref-image, or a local diffusers checkpoint dir")
@click.option("--prompt", required=True, help="the caption")
@click.option("--recipe", default="baseline", show_default=True, help="e.g. 'fixed-interval(interval=3)' or a .toml file")
@click.option("--steps", default=None, type=int, help="default: the model's own (a distilled student's K), else 20")
@click.option("--guidance-scale", default=None, type=float,
              help="default: the model's own (1 for a distilled student: no CFG), else 4.0")
@click.option("--seed", default=0, show_default=True, type=int)
@_size_options
@click.option("--out", default="cadence-out.gif", show_default=True, type=click.Path(dir_okay=False, path_type=Path),
              help="a .gif, .mp4 or .png file")
@click.option("--device", default=None, callback=_device, help="cpu or cuda (default: cuda when available)")
@click.option("--parallel", default=None, help="spread the generation over the processes torchrun starts: "
              "'ulysses=N, ring=N, cfg=2', degrees multiplying to --nproc-per-node; add 'vae=1' to split the "
              "VAE decode over them too")
@click.option("--gen-length", default=64, show_default=True, type=int,
              help="diffusion LMs (--model ref-dllm): tokens to generate")
@click.pass_context
def generate(ctx, model, prompt, recipe, steps, guidance_scale, seed, height, width, frames, out, device, parallel,
             gen_length):
    """Generate one video (or image) from a prompt, optionally accelerated; with a diffusion
    LM (ref-dllm), stream the text as it is decoded (`cadence dllm generate`, but --recipe's
    default, baseline, is plain decoding here, as it is the unaccelerated model for videos)."""
    if _is_dllm(model):
        from cadence.dllm.cli import generate as dllm_generate

        _dllm_options(ctx, ("model", "prompt", "recipe", "gen_length", "device"))
        # --recipe's default, baseline, is plain decoding: one token a step, no cache
        ctx.invoke(dllm_generate, model=model, prompt=prompt, recipe=recipe, gen_length=gen_length, device=device)
        return
    _video_options(ctx)
    _quiet()
    import cadence
    from cadence import generation
    from cadence.bench.runner import check_writable
    from cadence.reference.pipelines import check_generation_args

    try:
        _check_out(out)
        (parsed,) = _recipes((recipe,))
        check_generation_args(prompt, None, *generation.sampling(None, steps, guidance_scale))  # what is given
        generation.check_seed(seed)
        _check_size(model, height, width, frames)
        _check_model(model)
        check_writable(out.parent if str(out.parent) else Path("."))
        from cadence.parallel import start

        spread, device, writer = start(parallel, device)
        pipe = cadence.load(model, device=device)
        size = generation.resolve_size(pipe, height, width, frames)
        steps, guidance_scale = generation.sampling(pipe, steps, guidance_scale)
        generation.check_steps(steps, generation.step_limit(pipe))
        with cadence.accelerate(pipe, parsed, parallel=spread) as acceleration:
            output = generation.generate(pipe, prompt, steps=steps, seed=seed, guidance_scale=guidance_scale, size=size)
            stats, notes = acceleration.stats(), acceleration.notes()
    except (ValueError, FileNotFoundError, FloatingPointError) as error:
        _fail(error)
    if not writer:  # every rank holds the output; the first writes it
        return
    try:
        written = _write_atomically(out, output)
    except OSError as error:
        _fail(ValueError(f"cannot write {out}: {error.strerror or error}"))
    for note in notes:
        click.echo(f"note: {note}")
    click.echo(f"wrote {written} ({size}; {parsed}; {stats or 'no acceleration'})")


def _bench(model, recipes, prompts, limit, seeds, steps, guidance_scale, out, device, videos=False,
           height=None, width=None, frames=None):
    _quiet()
    from cadence import generation
    from cadence.bench.runner import (
        BenchSettings,
        default_prompts,
        format_table,
        run_bench,
    )
    from cadence.reference.pipelines import check_sampling_args

    try:
        if steps is not None and steps <= 0:
            raise ValueError(f"--steps {steps} must be a positive integer")
        check_sampling_args(*generation.sampling(None, steps, guidance_scale))  # what is given
        _check_size(model, height, width, frames)
        _check_model(model)
        settings = BenchSettings(
            model=model, recipes=_recipes(recipes), prompts=default_prompts(model, prompts, limit),
            seeds=list(range(seeds)), out=out, steps=steps, guidance_scale=guidance_scale,
            device=device, videos=videos, height=height, width=width, frames=frames,
        )
        _, summary = run_bench(settings)
    except (ValueError, FileNotFoundError, FloatingPointError) as error:
        _fail(error)
    click.echo(format_table(summary))
    click.echo(f"\nwrote {out}/results.jsonl, report.md, pareto.png, samples.png")


@main.command()
@click.option("--model", default="ref-video", show_default=True,
              help="ref-video, ref-image, or a local diffusers checkpoint dir (with --prompts FILE)")
@click.option("--recipe", "recipes", multiple=True,
              help="repeatable; a recipe string or a .toml file (required, but for a diffusion LM: its defaults)")
@click.option("--prompts", default="heldout", show_default=True,
              help="'heldout' (the reference models' held-out captions) or a file with one prompt per line")
@click.option("--limit", type=int, default=8, show_default=True, help="use the first N prompts")
@click.option("--seeds", type=int, default=2, show_default=True, help="seeds 0..S-1 per prompt")
@click.option("--steps", type=int, default=None, help="default: the model's own (a distilled student's K), else 20")
@click.option("--guidance-scale", type=float, default=None,
              help="default: the model's own (1 for a distilled student: no CFG), else 4.0")
@_size_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default="bench-out", show_default=True)
@click.option("--device", default=None, callback=_device, help="cpu or cuda (default: cuda when available)")
@click.option("--gen-length", default=512, show_default=True, type=int,
              help="diffusion LMs (--model ref-dllm): tokens to generate; --limit is then prompts per task")
@click.pass_context
def bench(ctx, model, recipes, prompts, limit, seeds, steps, guidance_scale, height, width, frames, out, device,
          gen_length):
    """Measure recipes against the unaccelerated baseline: time, memory, PSNR, SSIM; for a
    diffusion LM (ref-dllm), per-task accuracy, tokens/s and speedup (as `cadence dllm bench`)."""
    from cadence import generation

    if _is_dllm(model):
        from cadence.dllm.cli import bench as dllm_bench

        _dllm_options(ctx, ("model", "recipes", "limit", "out", "device", "gen_length"))
        ctx.invoke(dllm_bench, model=model, recipes=recipes, peers=True, tasks=None, prompts=limit,
                   gen_length=gen_length, batch_size=1, device=device, out=out)
        return
    _video_options(ctx)
    if not recipes:
        _fail(ValueError("--recipe is required (repeatable): a recipe string such as 'magcache(budget=0.3)' or a "
                         ".toml file; `cadence recipes` lists the techniques"))
    try:
        generation.check_count("--seeds", seeds, generation.MAX_SEEDS)
        generation.check_count("--limit", limit, generation.MAX_PROMPTS)
    except ValueError as error:
        _fail(error)
    _bench(model, recipes, prompts, limit, seeds, steps, guidance_scale, out, device,
           height=height, width=width, frames=frames)


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default="cadence-demo", show_default=True)
@click.option("--prompts", "limit", type=int, default=3, show_default=True, help="how many held-out prompts")
@click.option("--steps", type=int, default=20, show_default=True)
def demo(out, limit, steps):
    """The first run: ref-video on held-out prompts, unaccelerated and with a fast recipe; then
    its shipped 4-step student beside it."""
    if limit <= 0:
        _fail(ValueError(f"--prompts {limit} must be a positive integer"))
    click.echo(f"cadence demo: ref-video, {limit} held-out prompts, {steps} steps, baseline vs {DEMO_RECIPE}")
    _bench("ref-video", (DEMO_RECIPE,), "heldout", limit, 1, steps, 4.0, out, _default_device(), videos=True)
    click.echo(f"videos in {out}/videos/, side-by-side strip in {out}/samples.png, report in {out}/report.md")

    from cadence.bench.runner import default_prompts
    from cadence.distill.demo import student_beside_teacher

    click.echo(f"\nref-video-4step, a 4-step student (cadence distill), beside ref-video at {steps} steps with CFG:")
    shown = student_beside_teacher("ref-video-4step", default_prompts("ref-video", "heldout", limit), steps,
                                   _default_device(), out)
    fd = shown["fd"]
    click.echo(
        f"  forwards {shown['teacher_forwards']} -> {shown['student_forwards']}, "
        f"{shown['teacher_seconds']:.1f} s -> {shown['student_seconds']:.1f} s "
        f"({shown['teacher_seconds'] / shown['student_seconds']:.1f}x here); judge adherence "
        f"{shown['adherence']['teacher']:.3f} -> {shown['adherence']['student']:.3f}"
        + (f", FD {fd['teacher']:.1f} -> {fd['student']:.1f}" if fd["student"] is not None else ""))
    click.echo(f"  teacher and student frames in {out}/student.png, the student's videos in {out}/videos/student-*.gif")


@main.command()
@click.option("--model", type=_model_choice(), required=True)
@click.option("--seconds", type=float, default=480, show_default=True, help="optimisation time budget")
@click.option("--batch-size", type=int, default=None, help="default: 64 for ref-video, 128 for ref-image")
@click.option("--embeddings", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="precomputed caption embeddings (made here if missing and the text encoder is installed)")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="default: the packaged checkpoint folder")
@click.option("--device", default=None, callback=_device, help="cpu or cuda (default: cuda when available)")
@click.option("--precision", type=click.Choice(["bf16", "tf32"]), default="bf16", show_default=True,
              help="bf16 autocast, or fp32 with TF32 matmuls")
@click.option("--compile/--no-compile", "compile_blocks", default=True, show_default=True,
              help="torch.compile the repeated blocks (CUDA only)")
@click.option("--size", type=int, default=None,
              help="train at this frame side in pixels (default: the model's own); for progressive training")
@click.option("--init", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="start from this checkpoint folder's weights (e.g. a run at a smaller --size)")
@click.option("--prepare-only", is_flag=True, help="only compute the caption embeddings (on a CPU machine)")
def train(model, seconds, batch_size, embeddings, out, device, precision, compile_blocks, size, init, prepare_only):
    """Train a reference model with flow matching (about 8 minutes on one H100)."""
    _quiet()
    from cadence.reference.models import reference_model
    from cadence.reference.train import TrainSettings, prepare_embeddings
    from cadence.reference.train import train as run_training

    spec = reference_model(model)
    try:
        settings = TrainSettings(seconds=seconds, batch_size=batch_size or (64 if spec.task == "video" else 128),
                                 precision=precision, compile=compile_blocks, size=size, init=init)
    except ValueError as error:
        _fail(error)
    embeddings = embeddings or Path(".carry") / f"embeddings-{model}.safetensors"
    if not embeddings.is_file():
        click.echo(f"embedding training captions into {embeddings} ...")
        try:
            prepare_embeddings(spec, embeddings)
        except RuntimeError as error:
            _fail(error)
    if prepare_only:
        click.echo(f"wrote {embeddings}")
        return
    result = run_training(model, embeddings, out or spec.checkpoint, settings, device)
    click.echo(f"{model}: {result['steps']} steps, final loss {result['final_loss']:.4f}, held-out {result['heldout_loss']:.4f}")


@main.command()
@click.option("--model", "model", default="ref-video", show_default=True,
              help="ref-video, ref-image, or a local diffusers checkpoint dir")
@click.option("--technique", required=True, help="the technique to calibrate, e.g. teacache or magcache")
@click.option("--prompts", "count", type=int, default=8, show_default=True,
              help="how many training captions (seeds 0..N-1); never the held-out ones")
@click.option("--steps", type=int, default=None, help="default: the model's own (a distilled student's K), else 20")
@click.option("--guidance-scale", type=float, default=None,
              help="default: the model's own (1 for a distilled student: no CFG), else 4.0")
@_size_options
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="default: calibration/<technique>.json beside the model's transformer (packaged for ref-*)")
@click.option("--device", default=None, callback=_device, help="cpu or cuda (default: cuda when available)")
def calibrate(model, technique, count, steps, guidance_scale, height, width, frames, out, device):
    """Fit a technique's calibration (TeaCache's polynomial, MagCache's magnitude curve)
    by generating training captions with every step computed, at the size it will run at."""
    _quiet()
    import json

    from tqdm import tqdm

    import cadence
    from cadence import generation
    from cadence.bench.runner import check_writable
    from cadence.reference.pipelines import check_sampling_args

    try:
        from cadence.accel.registry import calibrations

        known = calibrations()
        if technique not in known:
            raise ValueError(f"--technique {technique!r} has no calibration; valid: {', '.join(known)}")
        generation.check_count("--prompts", count, generation.MAX_PROMPTS)
        if steps is not None and steps < 2:
            raise ValueError(f"--steps {steps} must be an integer >= 2 (calibration measures step-to-step changes)")
        check_sampling_args(*generation.sampling(None, steps, guidance_scale))  # what is given
        _check_size(model, height, width, frames)
        _check_model(model)
        if out is not None:
            check_writable(out.parent if str(out.parent) else Path("."))
        pipe = cadence.load(model, device=device)
        size = generation.resolve_size(pipe, height, width, frames)
        steps, guidance_scale = generation.sampling(pipe, steps, guidance_scale)
        if steps < 2:
            raise ValueError(f"{model} runs {steps} step(s): calibration measures step-to-step changes; give --steps >= 2")
        generation.check_steps(steps, generation.step_limit(pipe))
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        _fail(error)
    pipe.set_progress_bar_config(disable=True)
    runs = generation.calibration_runs(pipe, count, steps=steps, guidance_scale=guidance_scale, size=size)
    calibration = known[technique]
    with tqdm(total=len(runs), desc=f"calibrate {technique}", unit="gen") as progress:
        try:
            path = calibration.run(pipe, runs, out, progress=progress)
        except (ValueError, FloatingPointError) as error:
            _fail(error)
    click.echo(f"{technique} ({calibration.store}) on {model}: {count} training captions x {steps} steps at {size}, "
               f"guidance {guidance_scale}")
    click.echo(calibration.describe(json.loads(Path(path).read_text())))
    click.echo(f"wrote {path}")


@main.command()
@click.option("--model", "model", default="ref-video", show_default=True,
              help="ref-video, ref-image, or a local diffusers checkpoint dir")
@click.option("--recipe", required=True, help="one quantization technique, e.g. 'int8' or 'mixed(memory=0.3)'")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="the .safetensors to write")
@click.option("--device", default=None, callback=_device, help="cpu or cuda (default: cuda when available)")
def quantize(model, recipe, out, device):
    """Quantize a model's transformer once and save it; load it later with the same
    technique and checkpoint=OUT (no calibration or sensitivity run then)."""
    _quiet()
    import cadence
    from cadence.accel.quant import checkpoint
    from cadence.bench.runner import check_writable

    try:
        (parsed,) = _recipes((recipe,))
        terms = [t for t in parsed.techniques if t.level == "bit"]
        if len(terms) != 1 or len(parsed.techniques) != 1:
            raise ValueError(f"--recipe {recipe!r} must be exactly one quantization technique (level bit); "
                             "see `cadence recipes`")
        check_writable(out.parent if str(out.parent) else Path("."))
        pipe = cadence.load(model, device=device, text_encoder=False)
        acceleration = cadence.accelerate(pipe, parsed)
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
    path = checkpoint.save(pipe.transformer, out)
    stats = acceleration.stats()
    click.echo(f"{parsed} on {model}: {stats['quantized_layers']}, weight memory of the quantized linears "
               f"-{stats['weight_memory_saved']:.0%}")
    click.echo(f"wrote {path}; use it with --recipe \"{terms[0].name}(checkpoint='{path}')\"")


def _student_recipe(record: dict):
    """A few-step student's default: its teacher's without the step policy. Reusing one of a
    student's few steps costs far more than on a 50-step teacher (ref-video-4step: 28.7 dB for
    1.33x at best; benchmarks/RESULTS.md, "Caching on a 4-step student")."""
    from cadence.models.defaults import default_recipe
    from cadence.models.family import FamilyRecipe
    from cadence.recipe import Recipe

    teacher = default_recipe(str(record.get("teacher")))
    kept = Recipe([config for config in Recipe.parse(teacher.recipe).techniques if config.level != "step"])
    return FamilyRecipe(
        str(kept),
        f"the teacher's ({record.get('teacher')}: {teacher.recipe}) without its step policy: a "
        f"{record.get('steps')}-step student has no step to spare (benchmarks/RESULTS.md, \"Caching on a 4-step "
        "student\")",
        needs="nothing more (in every family's default, only the step policy reads a calibration)",
    )


@main.command()
@click.option("--model", "family", default=None,
              help="a family (wan, flux, sd3, cogvideox, hunyuan_video, ltx), ref-video / ref-image, or a few-step "
                   "student (ref-video-4step, or its folder): show its "
                   "default fast recipe and what it rests on")
def recipes(family):
    """List every technique with its parameters, defaults and description."""
    from cadence.accel.registry import load_builtin

    if family:
        from cadence.loading import student_record
        from cadence.models.defaults import default_recipe

        try:
            record = student_record(family)
            chosen = _student_recipe(record) if record else default_recipe(family)
        except ValueError as error:
            from cadence.reference.models import STUDENTS

            shipped = [name for name in STUDENTS if student_record(name)]
            raise click.BadParameter(f"{error}; or a shipped student ({', '.join(shipped)}) or a student's folder",
                                     param_hint="--model") from None
        click.echo(f"{family}: --recipe \"{chosen.recipe}\"")
        click.echo(f"    measured: {chosen.measured}")
        click.echo(f"    needs: {chosen.needs} (the reference models ship theirs)")
        return
    for name, technique in sorted(load_builtin().items()):
        config = technique.config
        click.echo(f"{name}  [{config.level}]  {config.summary}")
        for param, kind, default, help_text in config.describe():
            click.echo(f"    {param}: {kind} = {default!r}    {help_text}")
        click.echo(f"    e.g. --recipe '{config()}'\n")


if __name__ == "__main__":
    main()
