"""Diffusion-LM decoding at the real size: the LLaDA-8B configuration with random weights.

Question: at LLaDA-8B's size (``--size llada-8b``; LLaDA-MoE-7B-A1B's with ``--size llada-moe-7b-a1b``) on one GPU, how many tokens/s do plain decoding (one token per
step, no cache) and the cached recipes reach at generation lengths 256 / 512 / 1,024, block
32, batch 1 and 8, and what peak memory do they take? Every ratio is against plain decoding
measured in the same run.

Random weights cost the same time per forward as trained ones, but they are never confident,
so a confidence threshold would commit one token a step. The parallelism that
``parallel(threshold=0.9)`` reaches on a trained model is therefore stood in for by
``low-confidence(tokens_per_step=K)``: K tokens a step, K taken from ref-dllm's measured
forwards per token (``cadence dllm bench``, benchmarks/RESULTS.md). The timing covers the
first ``--blocks`` blocks of each generation (every block costs the same: one refresh and
the same number of cached steps over the same canvas), and tokens/s counts those blocks.

CPU check (tiny model, seconds):
    PYTHONPATH=src python benchmarks/dllm_real_size.py --size tiny --lengths 32 --batches 1 --blocks 1 --out /tmp/r.json
GPU (one H200): see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cadence import dllm
from cadence.models.llada import LLADA, build_llada

PLAIN = "semi-ar(block_length={block})"
RECIPES = ("semi-ar(block_length={block}) + low-confidence(tokens_per_step={k})",  # parallel decoding alone
           "semi-ar(block_length={block}) + prefix-cache",
           "semi-ar(block_length={block}) + dual-cache",
           "semi-ar(block_length={block}) + low-confidence(tokens_per_step={k}) + dual-cache")


@dataclass
class TokenIds:
    """What the engine needs of a tokenizer when prompts come as token ids."""

    vocab_size: int
    mask_token_id: int
    eos_token_id: int
    pad_token_id: int

    def __len__(self):
        return self.vocab_size


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_recipe(model, tokens, prompts, gen_length, recipe, blocks, block, device):
    """(seconds, forwards, peak bytes) to decode the first ``blocks`` blocks."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with dllm.accelerate(model, recipe):
        _sync(device)
        began = time.perf_counter()
        steps = dllm.decode_steps(model, tokens, prompts, gen_length)
        forwards = 0
        for canvas, start in steps:
            forwards += 1
            if not (canvas[:, start:start + blocks * block] == tokens.mask_token_id).any():
                steps.close()
                break
        _sync(device)
        seconds = time.perf_counter() - began
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return seconds, forwards, peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="llada-8b", choices=list(LLADA.configs))
    parser.add_argument("--lengths", default="256,512,1024")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=2, help="blocks timed per generation")
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--tokens-per-step", type=int, default=8, help="K of the parallel stand-in")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with device:  # initialise on the GPU: 8 B parameters take minutes on the CPU
        model = build_llada(args.size).eval()
    torch.set_default_dtype(previous)
    config = model.config
    tokens = TokenIds(config.vocab_size, config.mask_token_id, config.eos_token_id, config.pad_token_id)
    generator = torch.Generator().manual_seed(0)
    recipes = [PLAIN.format(block=args.block)] + [r.format(block=args.block, k=args.tokens_per_step) for r in RECIPES]
    rows = []
    for gen_length in map(int, args.lengths.split(",")):
        for batch in map(int, args.batches.split(",")):
            prompts = torch.randint(5, min(config.vocab_size, 30000), (batch, args.prompt_length),
                                    generator=generator).tolist()
            time_recipe(model, tokens, prompts, gen_length, recipes[0], 1, args.block, device)  # warm-up
            plain_rate = None
            for recipe in recipes:
                seconds, forwards, peak = time_recipe(model, tokens, prompts, gen_length, recipe, args.blocks,
                                                      args.block, device)
                rate = batch * args.blocks * args.block / seconds
                plain_rate = plain_rate or rate
                row = dict(gen_length=gen_length, batch=batch, recipe=recipe, seconds=round(seconds, 4),
                           forwards=forwards, tokens_per_second=round(rate, 2), speedup=round(rate / plain_rate, 2),
                           peak_gib=round(peak / 2**30, 2))
                rows.append(row)
                print(json.dumps(row), flush=True)
                args.out.with_suffix(".json.partial").write_text(json.dumps(rows, indent=1))
    meta = dict(size=args.size, device=torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
                torch=torch.__version__, dtype=str(dtype), block=args.block, blocks_timed=args.blocks,
                prompt_length=args.prompt_length, tokens_per_step=args.tokens_per_step,
                experts_implementation=getattr(model.model.layers[0].mlp, "experts_implementation", None),
                date=time.strftime("%Y-%m-%d"))
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
