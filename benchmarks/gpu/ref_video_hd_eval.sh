#!/usr/bin/env bash
# After ref_video_hd.sh: ref-video-hd's samples for its card, its attention concentration
# (benchmarks/attention_mass.py, blocks of 64 tokens) and the sparse patterns at density
# 0.25 and 0.5 against its own baseline (benchmarks/sparse_sweep.py), one GPU call.
#
#   bash benchmarks/gpu/ref_video_hd_eval.sh
# (carry .whl and .carry/hd with heldout-embeddings.safetensors from
# `cache_sweep.py --prepare-embeddings .carry/hd/heldout-embeddings.safetensors`)
set -uo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/gpu/carried.sh; install_carried .whl
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks PYTHONUNBUFFERED=1 OUT=${OUT:-bench-out}
timeout 120 python3 - <<'PY'
import os
from pathlib import Path

import torch

from cadence.reference import data
from cadence.reference.models import reference_model
from cadence.reference.text import load_prompt_embeddings
from cadence.reference.train import SAMPLE_PROMPTS, TrainSettings, _plot_samples, _sample

model = reference_model("ref-video-hd")
transformer = model.transformer_cls.from_pretrained(str(model.checkpoint / "transformer"), torch_dtype=torch.float32).cuda()
embedded = load_prompt_embeddings(Path(".carry/hd/heldout-embeddings.safetensors"))
prompts = data.heldout_prompts(SAMPLE_PROMPTS)
tensors = {"heldout_tokens": torch.cat([embedded[p][0] for p in prompts]).cuda().float(),
           "empty_tokens": embedded[""][0].cuda().float()}
samples = _sample(model, transformer, tensors, TrainSettings(), "cuda")
_plot_samples(samples, prompts, Path(os.environ["OUT"]) / "samples-card.png", True)
print("samples written")
PY
timeout 150 python3 benchmarks/attention_mass.py --model ref-video-hd --device cuda --block 64 --steps 10 --prompts 2 \
    --embeddings .carry/hd/heldout-embeddings.safetensors --out "$OUT/attention_mass-video-hd.json"
patterns="window radial sink topk svg router"
recipes=()
for p in $patterns; do recipes+=("sparse-$p(density=0.25, block=64)"); done
recipes+=("sparse-window(density=0.5, block=64)" "sparse-router(density=0.5, block=64)")
timeout 280 python3 benchmarks/sparse_sweep.py --model ref-video-hd --device cuda --prompts 4 --seeds 1 --steps 20 \
    --embeddings .carry/hd/heldout-embeddings.safetensors --recipes "${recipes[@]}" --out /tmp/sparse-hd
cp /tmp/sparse-hd/frontier.md /tmp/sparse-hd/summary.json "$OUT/"; cp /tmp/sparse-hd/samples.png "$OUT/sparse-samples.png"
ls "$OUT"
