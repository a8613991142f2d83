"""Bit reduction where linears dominate: a FLUX.1-dev-size FluxTransformer2DModel (12 B
parameters, random weights, bf16) at 1024 x 1024 (4,096 image + 512 text tokens), one
transformer forward per recipe (a 50-step generation is 50 of them: guidance is distilled,
no CFG), timed with CUDA events after warm-up, in one run; the linear and attention shares
of the baseline forward measured in the same run give each recipe's Amdahl ideal.

    python benchmarks/flux_realsize.py --out $OUT/flux_realsize.json
"""

from __future__ import annotations

import argparse
import json
import warnings
from datetime import date

import torch
from diffusers import FluxTransformer2DModel
from quant_linears import median_ms
from wan_realsize import SAGE, attention_time, linear_time

import cadence
from cadence.bench.metrics import ForwardShares, work_fraction
from cadence.models.real_configs import FLUX_DEV, FLUX_SIDE, FLUX_TEXT_TOKENS

SIDE = FLUX_SIDE  # 1024 px / 8 (VAE) / 2 (2x2 packing)
TEXT_TOKENS = FLUX_TEXT_TOKENS
RECIPES = ["baseline", "compile", f"compile + fp8 + {SAGE}", "fp8", "int8(smooth=0)", "torchao-float8", SAGE,
           f"fp8 + {SAGE}", "weight-int8", "weight-int4"]


def median_s(fn, reps: int = 5) -> float:
    return median_ms(fn, reps) / 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=RECIPES)
    parser.add_argument("--out", default="flux_realsize.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = FluxTransformer2DModel(**FLUX_DEV).eval()
    torch.set_default_dtype(torch.float32)
    grid = torch.arange(float(SIDE), device="cuda")
    image_ids = torch.stack(torch.meshgrid(torch.zeros(1, device="cuda"), grid, grid, indexing="ij"), -1).reshape(-1, 3)
    inputs = dict(
        hidden_states=torch.randn(1, SIDE * SIDE, 64, device="cuda", dtype=torch.bfloat16),
        encoder_hidden_states=torch.randn(1, TEXT_TOKENS, 4096, device="cuda", dtype=torch.bfloat16),
        pooled_projections=torch.randn(1, 768, device="cuda", dtype=torch.bfloat16),
        timestep=torch.tensor([0.5], device="cuda"), guidance=torch.tensor([3.5], device="cuda"),
        img_ids=image_ids, txt_ids=torch.zeros(TEXT_TOKENS, 3, device="cuda"), return_dict=False,
    )

    def forward():
        with torch.no_grad():
            return model(**inputs)[0]

    baseline_out = forward()
    forward_s = median_s(forward)
    linear_share = linear_time(model, forward) / forward_s
    joint = SIDE * SIDE + TEXT_TOKENS
    attention_share = attention_time(FLUX_DEV["num_attention_heads"], FLUX_DEV["attention_head_dim"], joint,
                                     FLUX_DEV["num_layers"] + FLUX_DEV["num_single_layers"]) / forward_s
    results = []
    for text in args.recipes:
        allocated = torch.cuda.memory_allocated()
        acceleration = cadence.accelerate(model, text)
        weights_gib = (torch.cuda.memory_allocated() - allocated) / 2**30
        forward()  # compile, tune kernels
        torch.cuda.reset_peak_memory_stats()
        seconds = median_s(forward)
        out = forward()
        error = float((out.float() - baseline_out.float()).norm() / baseline_out.float().norm())
        stats = acceleration.stats()
        acceleration.remove()
        fraction = work_fraction(stats, ForwardShares(attention_share, linear_share), acceleration.recipe) or 1.0
        results.append({"recipe": text, "forward_ms": 1000 * seconds, "speedup": forward_s / seconds,
                        "ideal_speedup": 1 / fraction, "relative_error_vs_bf16": error,
                        "weight_memory_change_gib": weights_gib, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                        **{k: stats[k] for k in ("linear_bytes", "linear_bytes_float") if k in stats}})
        print(json.dumps(results[-1]), flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": date.today().isoformat(),
            "config": "FLUX.1-dev size, random weights, bf16, 1024 x 1024", "forward_ms": 1000 * forward_s,
            "linear_share": linear_share, "attention_share": attention_share}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"\n{meta['device']}, torch {meta['torch']}; one forward {meta['forward_ms']:.0f} ms, linears "
          f"{linear_share:.0%}, attention {attention_share:.0%}")
    for r in results:
        print(f"{r['recipe']:<50} {r['forward_ms']:>8.1f} ms {r['speedup']:>5.2f}x (ideal {r['ideal_speedup']:.2f}x) "
              f"err {r['relative_error_vs_bf16']:.4f}  weights {r['weight_memory_change_gib']:+.1f} GiB")


if __name__ == "__main__":
    main()
