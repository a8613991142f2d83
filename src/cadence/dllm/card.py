"""The model card of a trained dLLM checkpoint: how it was made and what plain decoding scores."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from cadence.dllm.bench import bench
from cadence.dllm.tasks import TASKS

# Plain decoding as LLaDA evaluates its instruct model and as Fast-dLLM measures its baseline:
# one token per step, the most confident, in semi-autoregressive blocks of 32.
PLAIN = "semi-ar(block_length={block})"


def write_card(out: Path, model, tokenizer, summary: dict, command: str, prompts_per_task: int = 64,
               batch_size: int = 16) -> dict:
    config = summary["config"]
    gen, block = config["gen_length"], config["block_length"]
    plain = PLAIN.format(block=block)
    rows = bench(model, tokenizer, [], tasks=config["tasks"], prompts_per_task=prompts_per_task, gen_length=gen,
                 batch_size=batch_size, warmup=False, reference=plain, log=lambda *_: None)
    accuracy = rows[0].accuracy
    size_mb = sum(path.stat().st_size for path in out.glob("*.safetensors")) / 1e6
    parameters = sum(p.numel() for p in model.parameters())
    model_config = model.config
    lines = [
        f"# {out.name}", "",
        "A LLaDA-architecture masked-diffusion language model (transformers' `EuroBertForMaskedLM`: Llama blocks with",
        "bidirectional attention; `cadence.models.llada` says why this class) trained by `cadence dllm train` on",
        "cadence's synthetic exact-answer tasks (`cadence.dllm.tasks`), with its character tokenizer beside it.", "",
        "## Model",
        f"- {parameters / 1e6:.2f} M parameters: {model_config.num_hidden_layers} layers, width {model_config.hidden_size},"
        f" {model_config.num_attention_heads} heads, SwiGLU {model_config.intermediate_size}, context "
        f"{model_config.max_position_embeddings}; vocabulary {model_config.vocab_size} (characters + 5 special tokens).",
        f"- Weights in bf16 safetensors, {size_mb:.1f} MB.", "",
        "## Training",
        f"- Command: `{command}`",
        f"- {summary['steps']} steps of batch {config['batch']} in {summary['seconds']} s on {summary['device']} "
        f"(torch {summary['torch']}, {datetime.date.today().isoformat()}); final loss {summary['final_loss']}."
        + (f" Started from the weights of `{summary['init']}` ({summary['total_steps'] - summary['steps']} steps "
           f"before, a fresh optimizer): {summary['total_steps']} steps in all." if summary.get("init") else ""),
        f"- Generation canvases of {gen} tokens, and of a half and a quarter of that where an answer fits, "
        f"blocks of {block}; tasks: "
        f"{', '.join(config['tasks'])}.", "",
        "## Accuracy of plain decoding",
        f"Exact match on {prompts_per_task} held-out prompts a task (`tasks.evaluation_set`, seed 0), generation length "
        f"{gen}, `{plain}`: one token per step, the most confident, no cache.", "",
        "| task | accuracy |", "|---|---|",
        *[f"| {task} ({TASKS[task].summary}) | {value:.3f} |" for task, value in accuracy.items()],
        f"| mean | {rows[0].mean_accuracy:.3f} |", "",
    ]
    (out / "README.md").write_text("\n".join(lines))
    card = {"plain_recipe": plain, "accuracy": accuracy, "prompts_per_task": prompts_per_task, "command": command}
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return card
