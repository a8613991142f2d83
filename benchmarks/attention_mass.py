"""How much of a reference model's true attention each sparse pattern keeps: why the
patterns lose what they lose on ref-video and ref-image.

Runs a few held-out prompts through the model (CPU is fine: 1,024 video tokens), takes Q
and K at every self-attention call of every step after the dense ones, computes the exact
attention in the patterns' token order, and reports the mean share of each query's
attention mass inside each pattern's kept blocks, next to the oracle (the heaviest blocks
of each row at the same density: no block pattern can keep more).

    python benchmarks/attention_mass.py --model ref-video --out attention_mass-video.json
    python benchmarks/attention_mass.py --model ref-video-hd --device cuda \
        --embeddings .carry/heldout-embeddings.safetensors --out $OUT/attention_mass-video-hd.json   # GPU

ref-video-hd's 16,384 tokens make a (heads, tokens, tokens) float32 attention matrix of 4 GiB
per call: run it on the GPU, with the prompts' embeddings made on the CPU
(``cache_sweep.py --prepare-embeddings``), since the GPU machine has no text encoder.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import cadence
from cadence.accel.attention.heads import candidate
from cadence.accel.attention.patterns import Geometry, keep_count, sink_local
from cadence.bench.runner import default_prompts
from cadence.models import adapter_for
from cadence.reference.models import REFERENCE_MODELS

PATTERNS = ("window", "radial", "spatial", "temporal", "sink", "topk")
DENSITIES = (0.5, 0.25, 0.1)


class Recorder(TorchFunctionMode):
    """Keeps the captured mass of every joint self-attention call."""

    def __init__(self, adapter, block):
        super().__init__()
        self.adapter, self.block, self.layout = adapter, block, None
        self.sums: dict[tuple[str, float], float] = {}
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.layout is not None:
            query, key = (args[i] if len(args) > i else kwargs[name] for i, name in enumerate(("query", "key")))
            if query.shape[-2] == key.shape[-2] == self.layout.tokens:
                self.measure(query, key)
        return func(*args, **kwargs)

    def measure(self, query, key):
        geometry = Geometry(self.layout, self.block)
        order = geometry.order.to(query.device)
        tokens = min(geometry.pattern_blocks * self.block, self.layout.tokens)
        query, key = (x.index_select(-2, order)[..., :tokens, :].float() for x in (query, key))
        attention = torch.softmax(query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5, dim=-1)
        blocks = geometry.pattern_blocks
        per_block = F.pad(attention, (0, blocks * self.block - tokens)).unflatten(-1, (blocks, self.block)).sum(-1)
        row_block = torch.arange(tokens, device=query.device) // self.block  # (B, H, tokens, blocks): mass per key block
        for density in DENSITIES:
            keep = keep_count(density, blocks)
            oracle = per_block.topk(keep, dim=-1).values.sum(-1).mean()  # per query token, its own best blocks
            self.add(("oracle", density), oracle)
            for name in PATTERNS:
                if name == "sink":
                    mask = sink_local(blocks, density)[None, None]
                else:
                    mask = candidate(name, geometry, density, query, key, None)
                kept = mask.to(query.device)[..., row_block, :].float()  # (B or 1, H or 1, tokens, blocks)
                self.add((name, density), (per_block * kept).sum(-1).mean())
        self.calls += 1

    def add(self, key, value):
        self.sums[key] = self.sums.get(key, 0.0) + float(value)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ref-video", choices=list(REFERENCE_MODELS))
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--embeddings", default=None, help="precomputed prompt embeddings (no text encoder needed)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    pipe = cadence.load(args.model, device=args.device, text_encoder=args.embeddings is None)
    if args.embeddings:
        from cadence.reference.text import load_prompt_embeddings

        pipe.prompt_cache = load_prompt_embeddings(args.embeddings)
    pipe.set_progress_bar_config(disable=True)
    adapter = adapter_for(pipe.transformer)
    recorder = Recorder(adapter, args.block)
    dense_steps = round(0.2 * args.steps)

    forwards = itertools.count()  # two a step (CFG), args.steps steps a prompt

    def read_layout(module, a, kw):
        step = next(forwards) // 2 % args.steps
        recorder.layout = adapter.token_layout(a, kw) if step >= dense_steps else None

    hook = pipe.transformer.register_forward_pre_hook(read_layout, with_kwargs=True)
    with recorder, torch.no_grad():
        for prompt in default_prompts(args.model, "heldout", args.prompts):
            pipe(prompt=prompt, steps=args.steps, seed=0)
    hook.remove()
    table = {f"{name}@{density}": value / recorder.calls for (name, density), value in recorder.sums.items()}
    print(f"{args.model}: mean share of attention mass kept, {recorder.calls} calls, blocks of {args.block}")
    print(f"{'pattern':<10}" + "".join(f"{d:>8}" for d in DENSITIES))
    for name in ("oracle", *PATTERNS):
        print(f"{name:<10}" + "".join(f"{table[f'{name}@{d}']:>8.3f}" for d in DENSITIES))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "calls": recorder.calls, "block": args.block, "mass": table}, f, indent=1)


if __name__ == "__main__":
    main()
