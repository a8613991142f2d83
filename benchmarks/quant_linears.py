"""Per-linear speed at the Wan2.1-1.3B shapes (32,760 tokens; 1536 -> 1536, 1536 -> 8960,
8960 -> 1536), bf16 against each cadence mode and torchao's peers, quantization of the
activations included; the GEMM alone beside it, so the quantization overhead is visible.
The ceiling ratio is the measured GEMM throughput ratio (DESIGN.md: FP8 1391 / bf16 774
TFLOP/s = 1.80x; INT8 948 / 774 = 1.22x).

    python benchmarks/quant_linears.py --out $OUT/quant_linears.json
"""

from __future__ import annotations

import argparse
import copy
import json
import warnings
from datetime import date

import torch

from cadence.accel.quant import formats
from cadence.accel.quant.linear import QuantLinear

TOKENS = 32_760
SHAPES = [(1536, 1536), (1536, 8960), (8960, 1536)]  # (in, out): attention projections, FFN up, FFN down
MODES = ["fp8", "int8", "weight-int8", "weight-int4"]
CEILING = {"fp8": 1391 / 774, "int8": 948 / 774}


def median_ms(fn, reps: int = 30) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def torchao_linear(linear: torch.nn.Linear, name: str):
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8DynamicActivationInt8WeightConfig,
        PerRow,
        quantize_,
    )

    module = copy.deepcopy(linear)
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()) if name == "float8" else \
        Int8DynamicActivationInt8WeightConfig()
    quantize_(module, config)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="quant_linears.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    rows = []
    for in_features, out_features in SHAPES:
        linear = torch.nn.Linear(in_features, out_features, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(TOKENS, in_features, device="cuda", dtype=torch.bfloat16)
        flops = 2 * TOKENS * in_features * out_features
        with torch.no_grad():
            bf16 = median_ms(lambda: linear(x))
            row = {"shape": f"{TOKENS} x {in_features} -> {out_features}", "bf16_ms": bf16,
                   "bf16_tflops": flops / bf16 / 1e9}
            for mode in MODES:
                module = QuantLinear.from_linear(linear, mode)
                row[f"{mode}_ms"] = median_ms(lambda: module(x))
                row[f"{mode}_error"] = float((module(x) - linear(x)).float().norm() / linear(x).float().norm())
            # The GEMM alone, on pre-quantized activations: the ceiling the layer can reach.
            fp8 = QuantLinear.from_linear(linear, "fp8")
            scale = formats.absmax_scale(x, formats.FP8_MAX)
            xq = formats.quantize_fp8(x, scale)
            row["fp8_gemm_ms"] = median_ms(lambda: torch._scaled_mm(
                xq, fp8.weight.t(), scale_a=scale, scale_b=fp8.weight_scale, out_dtype=torch.bfloat16,
                use_fast_accum=True))
            int8 = QuantLinear.from_linear(linear, "int8")
            xi = formats.quantize_int8(x, formats.absmax_scale(x, formats.INT8_MAX))
            row["int8_gemm_ms"] = median_ms(lambda: torch._int_mm(xi, int8.weight.t()))
            w_row_major = int8.weight.t().contiguous()  # (in, out): which layout cuBLASLt's int8 path wants
            row["int8_gemm_row_major_b_ms"] = median_ms(lambda: torch._int_mm(xi, w_row_major))
            for peer in ("float8", "int8"):
                try:
                    module = torchao_linear(linear, peer)
                    row[f"torchao_{peer}_ms"] = median_ms(lambda: module(x))
                except Exception as error:  # noqa: BLE001 - a peer that fails is reported, not fatal
                    row[f"torchao_{peer}_error"] = f"{type(error).__name__}: {error}"[:200]
        for mode in ("fp8", "int8"):
            row[f"{mode}_speedup"] = bf16 / row[f"{mode}_ms"]
            row[f"{mode}_gemm_speedup"] = bf16 / row[f"{mode}_gemm_ms"]
            row[f"{mode}_of_ceiling"] = row[f"{mode}_speedup"] / CEILING[mode]
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": date.today().isoformat(),
            "tokens": TOKENS, "ceiling": CEILING}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    print(f"\n{meta['device']}, torch {meta['torch']}")
    print(f"{'shape':<26} {'bf16':>7} {'fp8':>7} {'fp8 gemm':>9} {'x':>6} {'/ceil':>6} {'int8':>7} {'x':>6} "
          f"{'w-int8':>7} {'w-int4':>7} {'ao-fp8':>7} {'ao-int8':>7}")
    for r in rows:
        print(f"{r['shape']:<26} {r['bf16_ms']:>7.3f} {r['fp8_ms']:>7.3f} {r['fp8_gemm_ms']:>9.3f} "
              f"{r['fp8_speedup']:>5.2f}x {r['fp8_of_ceiling']:>6.0%} {r['int8_ms']:>7.3f} {r['int8_speedup']:>5.2f}x "
              f"{r['weight-int8_ms']:>7.3f} {r['weight-int4_ms']:>7.3f} {r.get('torchao_float8_ms', float('nan')):>7.3f} "
              f"{r.get('torchao_int8_ms', float('nan')):>7.3f}")


if __name__ == "__main__":
    main()
