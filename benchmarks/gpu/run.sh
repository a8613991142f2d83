#!/usr/bin/env bash
# Run one benchmark script on the GPU machine: bash benchmarks/gpu/run.sh [OPTIONS] SCRIPT.py [ARGS...]
#
#   --timeout SECONDS  stop the script after SECONDS (a call is cut at 600 s, and what runs
#                      after the script in the same call needs time too)
#   --parts N          sweeps built on cache_sweep.py only: run N interleaved parts
#                      (--part i/N) in parallel, each with its own CADENCE_CACHE, then
#                      --merge them into --out (required)
#
# Runs `python3 benchmarks/SCRIPT.py ARGS` from the repository root with unbuffered output,
# after installing what .whl/ carries (once per machine, gpu/carried.sh) and with PYTHONPATH
# /tmp/site:src:benchmarks. What it leaves under $OUT (bench-out/ when unset), NAME being
# --out's file name without its extension (the script's name without --out):
#   NAME.log   the device line, the command and everything the script printed
#   NAME.tgz   a folder --out (the sweeps), packed with its parts and their logs; the folder
#              itself leaves $OUT, because the tool brings back at most 8 files
# A finished --out file's NAME.json.partial (written as results come in) is removed.
# Prints the log's last lines without warnings. Exits with the script's status (124: timed
# out). benchmarks/README.md says what to carry and gives every benchmark's command.
set -uo pipefail

usage() { sed -n 2,8p "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
timeout_s=0 parts=0
while [[ $# -gt 0 && $1 == --* ]]; do
    case $1 in
        --timeout) timeout_s=${2:?--timeout needs seconds}; shift 2 ;;
        --parts) parts=${2:?--parts needs a count}; shift 2 ;;
        *) usage ;;
    esac
done
[[ $# -ge 1 ]] || usage
script=${1#benchmarks/}; shift
cd "$(dirname "$0")/../.." || exit 1
[[ -f benchmarks/$script ]] || { echo "run.sh: no benchmarks/$script" >&2; exit 2; }

export OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

# --out's value, and the arguments without it (--parts gives each part its own).
out="" args=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --out) out=${2:-}; shift 2 || shift ;;
        --out=*) out=${1#--out=}; shift ;;
        *) args+=("$1"); shift ;;
    esac
done
name=$(basename "${out:-${script%.py}}"); name=${name%.*}
log=$OUT/$name.log
[[ $parts -eq 0 || -n $out ]] || { echo "run.sh: --parts needs --out" >&2; exit 2; }

source benchmarks/gpu/carried.sh
install_wheels() {  # parallel runs on one machine install once, one at a time
    compgen -G ".whl/*" >/dev/null || return 0
    local wanted rc=0; wanted=$(ls .whl/* | sort | md5sum)
    exec 9>/tmp/site.lock
    command -v flock >/dev/null && flock 9
    if [[ $(cat /tmp/site/.carried-wheels 2>/dev/null) != "$wanted" ]]; then
        { install_carried .whl && echo "$wanted" >/tmp/site/.carried-wheels; } || rc=1
    fi
    exec 9>&-
    return $rc
}

run_python() {  # LOG ARGS...: the script under the timeout, all output to LOG
    local to=$1; shift
    if [[ $timeout_s -gt 0 ]]; then
        timeout "$timeout_s" python3 "benchmarks/$script" "$@" >>"$to" 2>&1
    else
        python3 "benchmarks/$script" "$@" >>"$to" 2>&1
    fi
}

quiet() { grep -v -i "warn"; }  # torch's and diffusers' warnings drown the tables

device=$(nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader 2>/dev/null | head -1)
printf '# %s %s %s\n# %s\n' "$(date -u +%FT%TZ)" "$script" "${args[*]} ${out:+--out $out}" "${device:-no GPU}" >"$log"
install_wheels >>"$log" 2>&1 || { echo "run.sh: installing .whl/ failed, see $log" >&2; tail -5 "$log" >&2; exit 1; }

began=$SECONDS
if [[ $parts -gt 0 ]]; then
    work=/tmp/cadence-parts/$name
    rm -rf "$work"; mkdir -p "$work"
    pids=() folders=()
    for i in $(seq 1 "$parts"); do
        folders+=("$work/part-$i")
        CADENCE_CACHE=$work/cache-$i run_python "$work/part-$i.log" "${args[@]}" --part "$i/$parts" \
            --out "$work/part-$i" &
        pids+=($!)
    done
    rc=0
    for i in $(seq 1 "$parts"); do
        wait "${pids[$((i - 1))]}"; part_rc=$?
        echo "part $i/$parts: exit $part_rc" >>"$log"
        [[ $part_rc -eq 0 ]] || rc=$part_rc
    done
    run_python "$log" "${args[@]}" --merge "${folders[@]}" --out "$out" || rc=$?
else
    if [[ -n $out ]]; then run_python "$log" "${args[@]}" --out "$out"; else run_python "$log" "${args[@]}"; fi
    rc=$?
fi

[[ $rc -eq 0 && -f $out && -f $out.partial ]] && rm "$out.partial"
members=()  # a sweep's folder (images, videos, tables) and its parts, packed into one file
[[ -d $out ]] && members+=(-C "$(dirname "$out")" "$(basename "$out")")
[[ $parts -gt 0 ]] && members+=(-C "$work" $(cd "$work" && ls -d part-*))
if [[ ${#members[@]} -gt 0 ]]; then
    tar czf "$OUT/$name.tgz" "${members[@]}"
    [[ -d $out ]] && case $(realpath "$out") in "$(realpath "$OUT")"/*) rm -rf "$out" ;; esac
fi

echo "== $name: $script exited $rc after $((SECONDS - began)) s on ${device:-no GPU}; full log $log =="
if [[ $parts -gt 0 ]]; then
    for i in $(seq 1 "$parts"); do
        grep -i "failed\|error" "$work/part-$i.log" | quiet | tail -3
        echo "part $i: $(quiet <"$work/part-$i.log" | grep -v "^[[:space:]]*$" | tail -1 | cut -c1-200)"
    done
fi
quiet <"$log" | tail -n 30
exit "$rc"
