"""Sparse attention patterns swept on a reference model in one run, next to the caching
policies they compete and compose with.

Every pattern at densities 0.5 / 0.25 / 0.1 (dense for the first 20 % of steps), blocks of
16 tokens (ref-video has 1,024 video tokens, 64 blocks; ref-image 256 image tokens, 16
blocks, plus its text); MagCache and fixed-interval at budgets 0.4 / 0.5 as the caching
reference points; and MagCache composed with two patterns. Same held-out prompts, seeds
and outputs as ``cache_sweep.py``; writes the bench files and frontier.png / frontier.md.
The x axis is the ideal speedup at the real size: attention work removed counts for its
share of a Wan2.1-1.3B 480p forward (``cadence.bench.metrics.ATTENTION_SHARE``).

    python benchmarks/sparse_sweep.py --model ref-video --embeddings .carry/heldout-embeddings.safetensors \\
        --out $OUT/sparse-video
"""

from __future__ import annotations

from cache_sweep import main

PATTERNS = ["sparse-window", "sparse-radial", "sparse-sink", "sparse-topk", "sparse-svg", "sparse-router"]
DENSITIES = [0.5, 0.25, 0.1]
BLOCK = 16
CACHING = [f"{policy}(budget={budget})" for policy in ("magcache", "fixed-interval") for budget in (0.4, 0.5)]
COMPOSED = [f"magcache(budget=0.5) + {pattern}(density=0.25, block={BLOCK})" for pattern in ("sparse-window", "sparse-svg")]


def sparse_recipes() -> list[str]:
    patterns = [f"{p}(density={d}, block={BLOCK})" for p in PATTERNS for d in DENSITIES]
    return patterns + CACHING + COMPOSED


if __name__ == "__main__":
    main(default_recipes=sparse_recipes, description=__doc__)
