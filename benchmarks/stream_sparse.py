"""Fidelity of ``kv-sparse`` (chunk-aware sparse attention over the KV cache) against the dense
cache, on ref-video streamed chunk by chunk, on the CPU.

    OMP_NUM_THREADS=2 python benchmarks/stream_sparse.py --out stream_sparse.json

Every setting streams the same captions and seeds (``--chunks`` chunks of ``--frames-per-chunk``
latent frames, ``--steps`` steps each) over ``kv-full``, which keeps every frame; the reference is
``kv-full`` alone (the dense cache). Per setting it reports the PSNR (dB, over [-1, 1]) of all the
stream's frames against the dense stream's (the error pooled over a run's frames), its mean and
its minimum over the (caption, seed) runs; and the share of cached frames the attention read (``kv_sparse_read_share``:
frames read / frames cached, summed over every attention call of the stream, the first chunk,
which has no cache, left out). Each chosen setting sits beside a control of the same budget that
chooses nothing (``frames=0`` with a longer ``recent``): a fixed sink and window over the same
cache, at the same positions, so the comparison isolates the choice by score.

ref-video is a bidirectional model run causally: it drifts, and the dense stream is the reference
here, not a good video. No speed is measured (CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

CAPTIONS = (
    "a small red square moves left over a blue gradient",
    "a large white triangle stays still over an orange checkerboard",
)
SETTINGS = (
    "kv-sparse(frames=1, sink=1, recent=2)",
    "kv-sparse(frames=0, sink=1, recent=3)",
    "kv-sparse",  # Light Forcing's: 1 sink, 2 recent, 3 chosen
    "kv-sparse(frames=0, sink=1, recent=5)",
    "kv-sparse(frames=5, sink=1, recent=2)",
    "kv-sparse(frames=0, sink=1, recent=7)",
)


def _stream(pipe, embeds, recipe: str, args, seed: int):
    """(frames (T, 3, H, W), stats of the last recipe term) of one stream."""
    import cadence
    from cadence.stream import stream

    acceleration = cadence.accelerate(pipe, recipe)
    try:
        chunks = list(
            stream(
                pipe,
                embeds,
                chunks=args.chunks,
                frames_per_chunk=args.frames_per_chunk,
                steps_per_chunk=args.steps,
                seed=seed,
            )
        )
        stats = acceleration.handles[-1].stats()
    finally:
        acceleration.remove()
    return torch.cat([chunk.frames[0] for chunk in chunks]), stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--frames-per-chunk", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import cadence
    from cadence.bench.metrics import psnr
    from cadence.stream.cli import _embeddings

    torch.manual_seed(0)
    pipe = cadence.load("ref-video", device="cpu")
    runs = [(caption, seed) for caption in CAPTIONS for seed in range(args.seeds)]
    embeds = {caption: _embeddings(pipe, caption, "cpu") for caption in CAPTIONS}
    dense = {(caption, seed): _stream(pipe, embeds[caption], "kv-full", args, seed)[0] for caption, seed in runs}
    rows = []
    for setting in SETTINGS:
        values, read, cached = [], 0, 0
        for caption, seed in runs:
            frames, stats = _stream(pipe, embeds[caption], f"kv-full + {setting}", args, seed)
            values.append(psnr(frames, dense[caption, seed]))
            read, cached = read + stats["kv_sparse_frames_read"], cached + stats["kv_sparse_frames_cached"]
        rows.append(
            {
                "recipe": f"kv-full + {setting}",
                "psnr_db_mean": sum(values) / len(values),
                "psnr_db_min": min(values),
                "read_share": read / cached,
                "runs": len(values),
            }
        )
        row = rows[-1]
        print(
            f"{row['recipe']:<50} PSNR {row['psnr_db_mean']:6.2f} dB (min {row['psnr_db_min']:6.2f})  "
            f"cached frames read {row['read_share']:.3f}",
            flush=True,
        )
    if args.out is not None:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
