"""Score decoding recipes on ref-dllm: exact-match accuracy per task, tokens/s, speedup.

Every recipe decodes the same evaluation prompts (``tasks.evaluation_set``, seed 0) in the
same run; the speedup is tokens/s against the first row, plain decoding (one token per step,
no cache). tokens/s counts the whole generation canvas (``gen_length`` tokens a prompt, EOS
tail included), the convention of Fast-dLLM's throughput at a fixed generation length.

Peers decode the same prompts with the same model through their own loops: diffusers'
``LLaDA2Pipeline`` with its ``BlockRefinementScheduler`` (``peer:llada2(threshold=...)``) for a
LLaDA-family model; DiffusionGemma's own ``generate`` (``peer:diffusion-gemma(entropy_bound=...,
max_denoising_steps=...)``, each setting its default when left out) for a DiffusionGemma. Its
``generate`` samples: it is seeded, without touching the caller's random state.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cadence.dllm import gemma
from cadence.dllm.engine import decode_answers, generate
from cadence.dllm.load import accelerate
from cadence.dllm.tasks import check_tasks, evaluation_set

BASELINE = "baseline"  # the empty recipe: one token per step over the whole canvas
PEER = re.compile(r"^peer:llada2\((?:threshold=)?([0-9.]+)\)$")
GEMMA_PEER = re.compile(r"^peer:diffusion-gemma(?:\((.*)\))?$")  # its defaults without parentheses


@dataclass
class Row:
    recipe: str
    accuracy: dict[str, float]  # task -> exact-match fraction
    mean_accuracy: float
    tokens_per_second: float
    forwards_per_generation: float  # forwards of one decoding call (a batch decodes together)
    seconds: float
    speedup: float = 1.0


def _sync(model):
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _decode_llada2(model, tokenizer, prompts, gen_length, block_length, threshold):
    """diffusers' LLaDA2Pipeline on the same model: returns (answers, forwards)."""
    from diffusers import BlockRefinementScheduler, LLaDA2Pipeline

    pipe = LLaDA2Pipeline(model=model, scheduler=BlockRefinementScheduler(block_length=block_length),
                          tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    # left padding, whatever the tokenizer's default: the pipeline writes every row's answer from the
    # longest prompt's end, so a right-padded row would start its answer after its padding (measured on
    # the H200 with right padding: 0.07 mean accuracy where one prompt at a time gives the plain decoder's)
    encoded = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    device = next(model.parameters()).device
    forwards = 0

    def count(*_):
        nonlocal forwards
        forwards += 1

    handle = model.register_forward_hook(count)
    try:
        output = pipe(input_ids=encoded["input_ids"].to(device), attention_mask=encoded["attention_mask"].to(device),
                      gen_length=gen_length, block_length=block_length, num_inference_steps=block_length,
                      threshold=threshold, sampling_method="greedy", editing_threshold=None, output_type="seq")
    finally:
        handle.remove()
    return decode_answers(tokenizer, output.sequences.cpu()), forwards


def _peer(model, tokenizer, recipe: str, gen_length: int):
    """The decoding function of a peer row, ``prompts -> (answers, forwards)``; None for a recipe.
    A peer of the other model family is refused: it would call the model as it cannot be called."""
    compact = recipe.replace(" ", "")
    llada2, diffusion_gemma = PEER.match(compact), GEMMA_PEER.match(compact)
    if not (llada2 or diffusion_gemma):
        return None
    if bool(diffusion_gemma) != gemma.is_diffusion_gemma(model):
        valid = "peer:diffusion-gemma(...)" if gemma.is_diffusion_gemma(model) else "peer:llada2(threshold=...)"
        raise ValueError(f"{recipe} does not decode a {type(model).__name__}; its peer is {valid}")
    if llada2:
        return lambda prompts: _decode_llada2(model, tokenizer, prompts, gen_length, 32, float(llada2.group(1)))
    settings = gemma.parse_peer_settings(diffusion_gemma.group(1) or "")

    def decode(prompts):
        tokens, forwards = gemma.decode_with_generate(model, tokenizer, prompts, gen_length, settings)
        return decode_answers(tokenizer, tokens), forwards

    return decode


def run_recipe(model, tokenizer, recipe: str, sets: dict, gen_length: int, batch_size: int,
               warmup: bool = True) -> Row:
    peer = _peer(model, tokenizer, recipe, gen_length)
    acceleration = None if peer or recipe == BASELINE else accelerate(model, recipe)
    correct, forwards, seconds, count, calls = {}, 0, 0.0, 0, 0

    def decode(prompts):
        if peer:
            return peer(prompts)
        result = generate(model, tokenizer, prompts, gen_length)
        return result.texts, result.forwards

    try:
        if warmup:  # the first calls of a loop pay allocator and kernel start-up: one untimed batch
            decode([prompt for prompt, _ in next(iter(sets.values()))[:batch_size]])
        for task, pairs in sets.items():
            hits = 0
            for first in range(0, len(pairs), batch_size):
                batch = pairs[first:first + batch_size]
                prompts = [prompt for prompt, _ in batch]
                _sync(model)
                began = time.perf_counter()
                answers, used = decode(prompts)
                _sync(model)
                seconds += time.perf_counter() - began
                forwards += used
                count += len(batch)
                calls += 1
                hits += sum(answer == expected for answer, (_, expected) in zip(answers, batch))
            correct[task] = hits / len(pairs)
    finally:
        if acceleration is not None:
            acceleration.remove()
    return Row(recipe, correct, sum(correct.values()) / len(correct), gen_length * count / seconds,
               forwards / calls, seconds)


def bench(model, tokenizer, recipes: list[str], tasks=None, prompts_per_task: int = 32, gen_length: int = 512,
          batch_size: int = 1, warmup: bool = True, reference: str = BASELINE, log=print) -> list[Row]:
    """One row per recipe after the ``reference`` (plain decoding: one token per step, no
    cache); speedups are against the reference, measured in the same run."""
    tasks = check_tasks(tasks) if tasks else None
    sets = {task: evaluation_set(task, prompts_per_task) for task in (tasks or _all_tasks())}
    recipes = [reference] + [recipe for recipe in recipes if recipe != reference]
    rows = []
    for recipe in recipes:
        row = run_recipe(model, tokenizer, recipe, sets, gen_length, batch_size, warmup)
        row.speedup = row.tokens_per_second / rows[0].tokens_per_second if rows else 1.0
        rows.append(row)
        log(f"{recipe:70s} acc {row.mean_accuracy:6.3f}  {row.tokens_per_second:9.1f} tok/s  x{row.speedup:5.2f}  "
            + " ".join(f"{task} {value:.2f}" for task, value in row.accuracy.items()))
    return rows


def _all_tasks():
    from cadence.dllm.tasks import TASKS

    return list(TASKS)


def write_report(rows: list[Row], out: Path, meta: dict) -> None:
    """rows.json, a markdown table and the frontier plot (accuracy against tokens/s)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.json").write_text(json.dumps({"meta": meta, "rows": [asdict(row) for row in rows]}, indent=2) + "\n")
    tasks = list(rows[0].accuracy)
    lines = [f"| recipe | {' | '.join(tasks)} | mean | tokens/s | speedup | forwards/generation |",
             "|---" * (len(tasks) + 5) + "|"]
    for row in rows:
        lines.append(f"| `{row.recipe}` | " + " | ".join(f"{row.accuracy[t]:.3f}" for t in tasks)
                     + f" | {row.mean_accuracy:.3f} | {row.tokens_per_second:.1f} | {row.speedup:.2f}x"
                     f" | {row.forwards_per_generation:.1f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    plot_frontier(rows, out / "frontier.png")


def plot_frontier(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        peer = row.recipe.startswith("peer:")
        axis.scatter(row.tokens_per_second, row.mean_accuracy, marker="s" if peer else "o",
                     color="tab:gray" if peer else "tab:blue")
        axis.annotate(row.recipe.replace(" + ", "+"), (row.tokens_per_second, row.mean_accuracy), fontsize=6,
                      xytext=(3, 3), textcoords="offset points")
    axis.set_xscale("log")
    axis.set_xlabel("tokens/s (log)")
    axis.set_ylabel("mean exact-match accuracy")
    axis.set_title("accuracy against speed (squares: peers)")
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)
