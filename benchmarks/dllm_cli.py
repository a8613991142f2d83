"""Run ``cadence dllm`` (train | bench | generate) through benchmarks/gpu/run.sh on the GPU.

run.sh runs ``python3 benchmarks/SCRIPT.py ARGS``; the console script ``cadence`` is not
installed there, so this forwards its arguments to the same click group, e.g.
    bash benchmarks/gpu/run.sh dllm_cli.py bench --device cuda --batch-size 16 --out $OUT/dllm-bench
"""

from cadence.dllm.cli import dllm

if __name__ == "__main__":
    dllm(prog_name="cadence dllm")
