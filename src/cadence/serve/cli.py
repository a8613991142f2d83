"""``cadence serve``: the API and the page, on uvicorn, in one process."""

from __future__ import annotations

import os
from pathlib import Path

import click


@click.command()
@click.option("--model", "models", multiple=True, default=("ref-video",), show_default=True,
              help="repeatable: ref-video, ref-image, a checkpoint DIR, or NAME=DIR")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--api-key", default=None, envvar="CADENCE_API_KEY",
              help="require 'Authorization: Bearer KEY' on /v1 (or $CADENCE_API_KEY)")
@click.option("--data-dir", default="cadence-serve", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="job records and outputs; they survive a restart")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available)")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--concurrency", default=1, show_default=True, type=int, help="generations at once (each slot loads the models)")
@click.option("--queue-size", default=16, show_default=True, type=int, help="waiting jobs before 429")
@click.option("--time-limit", "time_limit_s", default=600.0, show_default=True, type=float, help="seconds per job")
@click.option("--steps", default=20, show_default=True, type=int, help="when a request names none")
@click.option("--max-steps", default=100, show_default=True, type=int)
@click.option("--max-side", default=1280, show_default=True, type=int, help="largest height or width, pixels")
@click.option("--max-frames", default=129, show_default=True, type=int)
def serve(models, host, port, api_key, data_dir, device, dtype, concurrency, queue_size, time_limit_s, steps,
          max_steps, max_side, max_frames):
    """Serve generation over HTTP: an OpenAI-style API and a web page at /."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import uvicorn

    from cadence.serve.app import create_app
    from cadence.serve.pipelines import load_models
    from cadence.serve.settings import ServeSettings

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        settings = ServeSettings(models=tuple(models), device=device, dtype=dtype, data_dir=data_dir, api_key=api_key,
                                 concurrency=concurrency, queue_size=queue_size, time_limit_s=time_limit_s,
                                 steps=steps, max_steps=max_steps, max_side=max_side, max_frames=max_frames)
        data_dir.mkdir(parents=True, exist_ok=True)
        click.echo(f"cadence serve: loading {', '.join(models)} on {device} ({concurrency} slot(s)) ...")
        loaded = load_models(settings)  # before the port opens: a bad --model fails here, in one line
    except (ValueError, FileNotFoundError, OSError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"cadence serve: http://{host}:{port}/  (API: /v1/videos, /v1/models, /v1/recipes; jobs in {data_dir})")
    # an open event stream would otherwise hold a shutdown until its job ends
    uvicorn.run(create_app(settings, loaded), host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
