"""Generations on the reference models, run once in one process and once spread over two
gloo processes on the CPU; ``test_parallel.py`` compares them."""

from __future__ import annotations

import os
import socket
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch

STEPS = 3
FRAMES = 4  # ref-video at 4 x 32 x 32: 256 video tokens, a quarter of its trained size, for speed
GUIDANCE = 4.0
TEXT_TOKENS = 8  # even: FLUX's plan splits the text tokens over the ranks too


@dataclass(frozen=True)
class Scenario:
    name: str
    model: str  # ref-video or ref-image
    recipe: str
    parallel: str  # ParallelConfig.parse text


SCENARIOS = (
    # every technique family, on both reference models' classes and both kinds of parallelism
    # 0.835: at step 1 the cond distances of the two token halves are 0.827 and 0.842, their
    # mean 0.8349: ranks deciding on their own halves would disagree (and wait on each other)
    Scenario("first-blocks-ulysses", "ref-video", "first-blocks(threshold=0.835)", "ulysses=2"),
    Scenario("fixed-interval-cfg", "ref-video", "fixed-interval(interval=2)", "cfg=2"),
    Scenario("window-ulysses", "ref-video", "sparse-window(density=0.5, dense_fraction=0, block=64)", "ulysses=2"),
    Scenario("window-image-ulysses", "ref-image", "sparse-window(density=0.5, dense_fraction=0, block=32)",
             "ulysses=2"),
    Scenario("fp8-ulysses", "ref-video", "fp8", "ulysses=2"),
    # Wan's default recipe (models/defaults.py), its budget raised to 0.5 so that 3 steps hold a
    # reused one, compile on aot_eager (traces the graphs, no kernel generation on 2 CPU cores)
    Scenario("default-ulysses", "ref-video", "magcache(budget=0.5) + compile(backend='aot_eager') + "
             "attention-backend(backend='sage')", "ulysses=2"),
)


def prompt_embeds(model: str) -> dict:
    """Seeded text embeddings: no text encoder to load, and an even token count."""
    generator = torch.Generator().manual_seed(0)
    embeds = {name: torch.randn(1, TEXT_TOKENS, 384, generator=generator) for name in ("cond", "uncond")}
    arguments = {"prompt_embeds": embeds["cond"], "negative_prompt_embeds": embeds["uncond"]}
    if model == "ref-image":
        pooled = {name: torch.randn(1, 384, generator=generator) for name in ("cond", "uncond")}
        arguments.update(pooled_prompt_embeds=pooled["cond"], negative_pooled_prompt_embeds=pooled["uncond"])
    return arguments


def load(model: str):
    from cadence.loading import load_reference

    return load_reference(model, text_encoder=False)


def generate(pipe, model: str) -> torch.Tensor:
    size = {"frames": FRAMES} if model == "ref-video" else {}
    pipe.set_progress_bar_config(disable=True)
    output = pipe(steps=STEPS, guidance_scale=GUIDANCE, seed=0, **size, **prompt_embeds(model))
    return (output.frames if model == "ref-video" else output.images)[0]


def single(scenario: Scenario, pipes: dict) -> dict:
    import cadence

    pipe = pipes.setdefault(scenario.model, load(scenario.model))
    with cadence.accelerate(pipe, scenario.recipe) as acceleration:
        output = generate(pipe, scenario.model)
        stats = acceleration.stats()
    return {"output": output, "stats": stats}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(rank: int, world: int, port: int, out: str, names: tuple[str, ...]) -> None:
    """One rank: every scenario in ``names`` under its parallel config, then the model after
    remove() against the unaccelerated one; results to ``out``/rank<r>.pt."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    import cadence
    from cadence.parallel import ParallelConfig, init

    # ranks that decided differently would wait on each other: fail in minutes, not hang
    init(torch.device("cpu"), timeout=timedelta(seconds=120))
    results, pipes = {}, {}
    try:
        for scenario in (s for s in SCENARIOS if s.name in names):
            pipe = pipes.setdefault(scenario.model, load(scenario.model))
            with cadence.accelerate(pipe, scenario.recipe, parallel=ParallelConfig.parse(scenario.parallel)) as acc:
                output = generate(pipe, scenario.model)
                stats = acc.stats()
            results[scenario.name] = {"output": output, "stats": stats}
        for model, pipe in pipes.items():  # after remove(): the one-process model, no collective left
            results[f"removed-{model}"] = {"output": generate(pipe, model)}
    except Exception:  # noqa: BLE001 - whatever failed, the parent reports it with its traceback
        results["error"] = traceback.format_exc()
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def run_both(out: str, names: tuple[str, ...], world: int = 2) -> tuple[list[dict], dict]:
    """-> (each rank's results, the one-process results by scenario name and 'baseline-MODEL').
    The one-process generations run here while the ranks run in theirs."""
    import torch.multiprocessing as mp

    ranks = mp.spawn(worker, args=(world, free_port(), out, names), nprocs=world, join=False)
    pipes: dict = {}
    singles = {s.name: single(s, pipes) for s in SCENARIOS if s.name in names}
    singles.update({f"baseline-{model}": {"output": generate(pipe, model)} for model, pipe in pipes.items()})
    while not ranks.join():
        pass
    return [torch.load(os.path.join(out, f"rank{rank}.pt"), weights_only=False) for rank in range(world)], singles
