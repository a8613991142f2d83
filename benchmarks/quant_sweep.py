"""Quantization modes on a reference model in one run: fidelity (PSNR / SSIM against the
unquantized model, same held-out prompts and seeds as ``cache_sweep.py``) for every mode
and calibration, torchao's float8 and int8 configurations as peers, low-precision
attention, quantization composed with MagCache, and mixed precision against uniform INT4
at the same weight memory. Writes the bench files and frontier.md.

    python benchmarks/quant_sweep.py --model ref-video --embeddings .carry/heldout-embeddings.safetensors \\
        --x speedup --out $OUT/quant-video
"""

from __future__ import annotations

from cache_sweep import main

SAGE = "attention-backend(backend='sage')"
# uniform weight-int4 at group 128 stores 0.25 + 4 / 128 / 2 = 0.266 of the bf16 bytes
INT4_MEMORY = 0.266
QUANT = [
    "fp8", "fp8(activations='static')", "fp8(smooth=0.5)", "int8", "int8(activations='static')", "int8(smooth=0)",
    "weight-int8", "weight-int4", "nvfp4", "nvfp4(rank=32, smooth=0.5)", "mxfp4", "mxfp4(rank=32, smooth=0.5)",
    "torchao-float8", "torchao-int8",
    SAGE, "attention-backend(backend='sage-fp8')", f"fp8 + {SAGE}", f"int8 + {SAGE}",
    "magcache(budget=0.5)", "magcache(budget=0.5) + int8", "magcache(budget=0.5) + fp8", f"magcache(budget=0.5) + int8 + {SAGE}",
]
# Mixed precision against uniform weight-int4 at its weight memory (needs the sensitivity
# calibration, `cadence calibrate --technique mixed`): `--recipes` these.
MIXED = ["weight-int4", f"mixed(memory={INT4_MEMORY})", f"mixed(memory={INT4_MEMORY}, formats='bf16,weight-int8,weight-int4')"]


if __name__ == "__main__":
    main(default_recipes=lambda: QUANT, description=__doc__)
