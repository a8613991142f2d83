#!/usr/bin/env bash
# What the GPU calls carry that the machine's image lacks, installed into /tmp/site:
#
#   source benchmarks/gpu/carried.sh; install_carried .whl [.carry/whl-tune ...]
#       every *.tar.xz in the folders unpacked into /tmp/site, every *.whl installed there by pip
#   bash benchmarks/gpu/carried.sh --repack .whl
#       here, once: each pure-Python wheel (*-none-any.whl) in the folder becomes a *.tar.xz of the
#       same files. A wheel is a zip, compressed one file at a time: diffusers 0.42.1's is 6.4 MB,
#       its tar.xz 2.0 MB, and what travels to the GPU (the tracked tree included) is at most 64 MiB.

install_carried() {
    mkdir -p /tmp/site
    local dir pack wheels=()
    for dir in "$@"; do
        for pack in "$dir"/*.tar.xz; do
            [[ -e $pack ]] || continue
            tar xJf "$pack" -C /tmp/site || return 1
        done
        for pack in "$dir"/*.whl; do
            [[ -e $pack ]] && wheels+=("$pack")
        done
    done
    ((${#wheels[@]} == 0)) ||
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    [[ ${1:-} == --repack && -d ${2:-} ]] || { sed -n 2,9p "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
    set -euo pipefail
    for wheel in "$2"/*-none-any.whl; do
        [[ -e $wheel ]] || continue
        work=$(mktemp -d)
        python3 -m zipfile -e "$wheel" "$work"
        tar cJf "${wheel%.whl}.tar.xz" -C "$work" .
        rm -rf "$work" "$wheel"
        echo "$(basename "$wheel") -> $(basename "${wheel%.whl}.tar.xz"): $(du -h "${wheel%.whl}.tar.xz" | cut -f1)"
    done
fi
