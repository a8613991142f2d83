#!/usr/bin/env bash
# Several GPUs (issue 23), in one call on the nvidia-h200-x2 kind (carry .whl):
#   bash benchmarks/gpu/parallel.sh [SIZES...]     (default: 14b 1.3b; STEPS=6 timed steps; TINY=1 on the CPU)
# For each size, parallel_realsize.py on 1 GPU then on 2 (--reference the first), so each
# speedup is measured in one call on one machine; then parallel_check_gpu.py (Ring, Ulysses
# and CFG parallel against one process) with the time left. Results and one log under $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
export OUT=${OUT:-bench-out} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
source benchmarks/gpu/carried.sh
install_carried .whl || exit  # the GPU machine: diffusers and tomli_w (nothing where .whl is absent)
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
deadline=$((SECONDS + ${CALL_SECONDS:-585}))
log=$OUT/parallel.log
gpus=$(nvidia-smi -L 2>/dev/null | wc -l); ((gpus)) || gpus=2
{ nvidia-smi -L 2>/dev/null; python3 -c "import torch; print('torch', torch.__version__)"; date -u; } >>"$log"

run() {  # run SECONDS_CAP ARGS...: torchrun with what is left of the call, at most SECONDS_CAP
    local cap=$1; shift
    local left=$((deadline - SECONDS)); ((left > cap)) && left=$cap
    ((left > 30)) || { echo "skipped (no time left): $*" >>"$log"; return 1; }
    echo "+ [$left s] torchrun $*" >>"$log"
    timeout "$left" python3 -m torch.distributed.run "$@" 2>&1 | grep -v -i -E "warn|^ *warnings\.|^ *return funcol" >>"$log"
}

sizes=("$@"); ((${#sizes[@]})) || sizes=(14b 1.3b)
tiny=(); [[ -n ${TINY:-} ]] && tiny=(--tiny)  # TINY=1: the CPU dry run (gloo, tiny configs)
for size in "${sizes[@]}"; do
    for n in 1 $gpus; do
        ref=()
        [[ $n != 1 ]] && ref=(--reference "$OUT/parallel-$size-1.json")
        cap=330; [[ $size == 1.3b ]] && cap=150
        run $cap --nproc-per-node "$n" benchmarks/parallel_realsize.py --size "$size" --steps "${STEPS:-6}" \
            --calibration-steps 6 "${ref[@]}" "${tiny[@]}" --out "$OUT/parallel-$size-$n.json"
    done
done
run 600 --nproc-per-node "$gpus" benchmarks/parallel_check_gpu.py "${tiny[@]}" --out "$OUT/parallel-check.json"
tail -40 "$log"
