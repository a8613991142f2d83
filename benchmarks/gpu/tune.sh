#!/usr/bin/env bash
# `cadence tune` on reference models on the GPU machine (issue 22):
#
#   bash benchmarks/gpu/tune.sh BUDGET MODEL...     e.g.  bash benchmarks/gpu/tune.sh 4.3m ref-video ref-image
#
# Carry `.whl`, `.carry/whl-tune` (optuna and what it needs that the machine's image lacks:
# sqlalchemy (its pure-Python wheel), alembic, mako, colorlog; benchmarks/README.md) and `.carry/tune-embeddings.safetensors`
# (the prompts' embeddings: the machine has no text encoder; made by the README's command).
# Per model, one after the other:
#   cadence tune --model MODEL --min-psnr 35 --steps 50 --device cuda --time-budget BUDGET --embeddings ... \
#       --speed-at REAL_SIZE
# REAL_SIZE: wan2.1-1.3b for ref-video, flux.1-dev for ref-image (issue 22's goal compares with the
# shipped default at the real size); SPEED_AT=0 times candidates on the reference model itself.
# with its output folder (report.md, frontier.png, recipe.*, check.json, study.db; the cached
# baseline outputs left out) packed into $OUT/tune-MODEL.tgz, and its log in $OUT/tune-MODEL.log.
set -uo pipefail
budget=${1:?usage: tune.sh BUDGET MODEL...}; shift
cd "$(dirname "$0")/../.." || exit 1
export OUT=${OUT:-bench-out} PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
mkdir -p "$OUT"
source benchmarks/gpu/carried.sh
install_carried .whl .carry/whl-tune || exit 1
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader
rc=0
for model in "$@"; do
    out=/tmp/tune/tune-$model
    speed_at=()
    if [[ ${SPEED_AT:-1} != 0 ]]; then
        case $model in ref-video*) speed_at=(--speed-at wan2.1-1.3b) ;; ref-image) speed_at=(--speed-at flux.1-dev) ;; esac
    fi
    python3 -m cadence.cli tune --model "$model" --min-psnr 35 --steps 50 --device cuda --time-budget "$budget" \
        --embeddings .carry/tune-embeddings.safetensors "${speed_at[@]}" --out "$out" >"$OUT/tune-$model.log" 2>&1
    status=$?
    [[ $status -eq 0 ]] || rc=$status
    echo "== $model: exit $status"
    grep -v -i "warn\|return install" "$OUT/tune-$model.log" | tail -6
    tar czf "$OUT/tune-$model.tgz" --exclude baselines -C /tmp/tune "tune-$model"
done
exit "$rc"
