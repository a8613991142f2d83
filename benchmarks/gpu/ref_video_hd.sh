#!/usr/bin/env bash
# Train ref-video-hd on one GPU in one call, progressively, from ref-video's weights:
#   stage 1: 64 x 64 pixels (16 x 16 x 16 = 4,096 tokens), batch 64, STAGE1 seconds
#   stage 2: 128 x 128 pixels (16 x 32 x 32 = 16,384 tokens), batch 32, STAGE2 seconds
# then writes the checkpoint, its card, loss curve and samples under $OUT/ref-video-hd.
#
#   bash benchmarks/gpu/ref_video_hd.sh --prepare              (here, with the text encoder)
#   bash benchmarks/gpu/ref_video_hd.sh [STAGE1 [STAGE2]]     (GPU; defaults 170 and 330)
#
# --prepare embeds the captions (`cadence train --model ref-video-hd --prepare-only`) and cuts
# the file to 1,024 training captions and 64 evaluation clips, xz-compressed into .carry/hd/:
# what travels to the GPU machine, tree and carried paths together, is at most 64 MiB.
# The GPU call carries .whl and .carry/hd.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ ${1:-} == --prepare ]]; then
    .venv/bin/cadence train --model ref-video-hd --prepare-only
    mkdir -p .carry/hd
    .venv/bin/python - <<'PY'
import json
from safetensors import safe_open
from safetensors.torch import save_file

with safe_open(".carry/embeddings-ref-video-hd.safetensors", "pt") as f:
    metadata, tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
for split, keep in (("train", 1024), ("eval", 64)):
    metadata[split] = json.dumps(json.loads(metadata[split])[:keep])
    for kind in ("tokens", "pooled"):
        tensors[f"{split}_{kind}"] = tensors[f"{split}_{kind}"][:keep].contiguous()
save_file(tensors, ".carry/hd/embeddings-ref-video-hd.safetensors", metadata=metadata)
PY
    xz -T2 -6 -f .carry/hd/embeddings-ref-video-hd.safetensors
    exit
fi
stage1=${1:-170} stage2=${2:-330}
source benchmarks/gpu/carried.sh; install_carried .whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 OUT=${OUT:-bench-out}
xz -dkf .carry/hd/embeddings-ref-video-hd.safetensors.xz
embeddings=.carry/hd/embeddings-ref-video-hd.safetensors
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m cadence.cli train --model ref-video-hd --embeddings $embeddings --size 64 --batch-size 64 \
    --seconds "$stage1" --init src/cadence/reference/checkpoints/ref-video --out .carry/ref-video-hd-64 2>&1 | grep -v "step/s\]"
python3 -c "import json; r = json.load(open('.carry/ref-video-hd-64/train.json')); r.pop('loss_curve'); print(r)"
python3 -m cadence.cli train --model ref-video-hd --embeddings $embeddings --batch-size 32 \
    --seconds "$stage2" --init .carry/ref-video-hd-64 --out "$OUT/ref-video-hd" 2>&1 | grep -v "step/s\]"
