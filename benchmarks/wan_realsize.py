"""Real-size baseline: a Wan2.1-1.3B-size WanTransformer3DModel (random weights, bf16) at
480p x 81 frames (latents 16 x 21 x 60 x 104), 50 steps with CFG, through cadence's
pipeline path (RefVideoPipeline with precomputed text embeddings), unaccelerated and with
fixed-interval step reuse, timed with CUDA events after a warm-up, in one run.

Random weights cost the same time as trained ones for a fixed amount of compute.

    python benchmarks/wan_realsize.py --out $OUT/wan_realsize.json

``--set policies`` runs every cadence caching policy at budget 0.4 (equal cost), ``--set
peers`` diffusers' own hooks, ``--set sparse`` / ``patterns`` the sparse attention
patterns; each set times its own baseline in the same run. For sparse attention the ideal
speedup is Amdahl's, from the attention work kept and the self-attention share of a
forward measured in the same run. Per-forward
CUDA events split the time of computed and reused forwards: the reused forward's time over
fixed-interval's is an indicator's overhead.

``--vae`` also times Wan2.1's VAE decode of the 16 x 21 x 60 x 104 latent (AutoencoderKLWan at
diffusers' defaults, which are Wan2.1's, random weights, bf16), which every recipe leaves
as it is, and gives each recipe's end-to-end time: its denoising loop plus that decode (the
text encoder, run once per prompt, is still left out).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from datetime import date

import torch
from diffusers import WanTransformer3DModel

import cadence
from cadence.bench.metrics import ForwardShares, work_fraction
from cadence.models.real_configs import (
    WAN_1_3B,
    WAN_LATENT,
    WAN_TEXT_TOKENS,
    cast_like_from_pretrained,
)
from cadence.reference.models import reference_model
from cadence.reference.pipelines import RefVideoPipeline

LATENT = WAN_LATENT  # 480 x 832 x 81 frames through the Wan VAE (4x8x8)
TEXT_TOKENS = WAN_TEXT_TOKENS
BUDGET = 0.4
POLICIES = [  # cadence's policies at equal cost (budget mode)
    f"fixed-interval(budget={BUDGET})", f"fixed-interval(budget={BUDGET}, cfg_reuse=true)",
    f"first-blocks(budget={BUDGET})", f"taylorseer(order=2, budget={BUDGET})", f"block-delta(budget={BUDGET})",
    f"teacache(budget={BUDGET}, calibration='{{teacache}}')", f"magcache(budget={BUDGET}, calibration='{{magcache}}')",
    f"ertacache(budget={BUDGET}, calibration='{{ertacache}}')",
]
PEERS = [  # diffusers' hooks at the settings their docs recommend
    "diffusers-fbcache", "diffusers-magcache(calibration='{magcache}')", "diffusers-taylorseer", "diffusers-pab",
]
RECIPES = ["baseline", "fixed-interval(interval=2)", "fixed-interval(interval=3)"]
# Sparse attention (dense for the first 20 % of steps, the default): the 3D window at the
# issue's densities, every other pattern at 0.1, and the window on FlexAttention.
SPARSE = [
    "sparse-window(density=0.5)", "sparse-window(density=0.25)", "sparse-window(density=0.1)",
    "sparse-window(density=0.1, backend='flex')",
]
SPARSE_PATTERNS = [
    "sparse-radial(density=0.1)", "sparse-sink(density=0.1)", "sparse-topk(density=0.1)",
    "sparse-svg(density=0.1)", "sparse-router(density=0.1)",
]
# Bit reduction (20 steps: a ratio per step, and 10 recipes fit one GPU call). int8 without
# SmoothQuant: random weights have no calibration; torchao's configurations as peers.
SAGE = "attention-backend(backend='sage')"
QUANT = ["fp8", "int8(smooth=0)", "weight-int8", "weight-int4", "torchao-float8", "torchao-int8", SAGE,
         f"fp8 + {SAGE}", f"int8(smooth=0) + {SAGE}", f"fixed-interval(budget={BUDGET}) + fp8 + {SAGE}"]
# Composed recipes against diffusers' best hook (MagCache, 2.49x here at its docs' setting;
# calibrated on a short run and resampled to the run's steps, as cadence's MagCache is).
COMPOSED = [
    "diffusers-magcache(calibration='{magcache}', steps={steps})", "compile", f"compile + {SAGE}",
    f"compile + fp8 + {SAGE}", *(f"magcache(budget={b}, calibration='{{magcache}}') + compile + {SAGE}" for b in (0.3, 0.25, 0.2)),
    f"magcache(budget=0.25, calibration='{{magcache}}') + compile + fp8 + {SAGE}",
]
SETS = {"fixed": RECIPES, "policies": ["baseline", *POLICIES], "peers": ["baseline", *PEERS],
        "sparse": ["baseline", *SPARSE], "patterns": ["baseline", *SPARSE_PATTERNS],
        "quant": ["baseline", *QUANT], "composed": ["baseline", *COMPOSED]}


def cuda_time(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000


class ForwardTimer:
    """CUDA events around every transformer forward (read after the run: no sync inside)."""

    def __init__(self, model: torch.nn.Module):
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.handles = [model.register_forward_pre_hook(self._start), model.register_forward_hook(self._end)]

    def _start(self, *_):
        self.events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
        self.events[-1][0].record()

    def _end(self, *_):
        self.events[-1][1].record()

    def split(self, schedule: dict[str, list[int]]) -> dict[str, float]:
        """Mean ms of computed and of reused forwards; forwards run cond, uncond per step."""
        for handle in self.handles:
            handle.remove()
        times = [start.elapsed_time(end) for start, end in self.events]
        branches = [schedule[b] for b in ("cond", "uncond") if b in schedule]
        flags = [flags[step] for step in range(len(branches[0])) for flags in branches] if branches else []
        if len(flags) != len(times):
            return {}
        split = {}
        for name, value in (("computed_forward_ms", 1), ("reused_forward_ms", 0)):
            chosen = [t for t, flag in zip(times, flags) if flag == value]
            if chosen:
                split[name] = sum(chosen) / len(chosen)
        return split


def attention_time(heads: int, dim: int, tokens: int, calls: int, batch: int = 1, masked: bool = False,
                   device="cuda", dtype=torch.bfloat16) -> float:
    """Seconds of one forward's self- or joint-attention calls on the default SDPA backend:
    ``calls`` calls at (batch, heads, tokens, dim), the median of 20 timed calls after one
    untimed. A key mask (HunyuanVideo's padded text) rules out the flash kernel, so it is
    timed with one."""
    q, k, v = (torch.randn(batch, heads, tokens, dim, device=device, dtype=dtype) for _ in range(3))
    mask = torch.ones(batch, 1, 1, tokens, device=device, dtype=torch.bool) if masked else None

    def attend():
        torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    attend()
    times = [cuda_time(attend) for _ in range(20)]
    return sorted(times)[len(times) // 2] * calls


def linear_time(transformer, forward) -> float:
    """Seconds of one forward spent in the quantizable linears (CUDA events around each)."""
    from cadence.models import quantizable_linears

    events = []

    def start(*_):
        events.append([torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)])
        events[-1][0].record()

    def end(*_):
        events[-1][1].record()

    handles = []
    for linear in quantizable_linears(transformer).values():
        handles += [linear.register_forward_pre_hook(start), linear.register_forward_hook(end)]
    forward()
    torch.cuda.synchronize()
    for handle in handles:
        handle.remove()
    return sum(a.elapsed_time(b) for a, b in events) / 1000


def display(template: str, steps: int) -> str:
    """The recipe as reported: without this run's calibration path."""
    text = re.sub(r"calibration='\{\w+\}'(, )?", "", template).replace(", )", ")").replace("()", "")
    return text.replace("{steps}", str(steps))


def calibrate(pipe, call: dict, steps: int, techniques: set[str], folder: str) -> dict[str, str]:
    """Calibrate the random-weight model for the policies that need it. The fitted values
    do not change the cost of a run at a fixed budget, so one prompt is enough here."""
    from cadence.accel import calibration
    from cadence.accel.cache import ertacache, magcache, teacache
    from cadence.accel.cache.traces import record

    paths = {}
    run = dict(steps=steps, **call)
    if techniques & {"teacache", "magcache"}:
        traces = record(pipe, [run])
        for name, module in (("teacache", teacache), ("magcache", magcache)):
            if name in techniques:
                data = {**module.fit(traces), "steps": steps}
                paths[name] = str(calibration.save(pipe.transformer, name, data, f"{folder}/{name}.json"))
    if "ertacache" in techniques:
        # Residuals of every step are kept on the host to fit the rectification: at this
        # size 100 MB each, so calibrate on a short run (the schedule is resampled).
        short = dict(run, steps=min(steps, 10))
        paths["ertacache"] = str(ertacache.calibrate(pipe, [short], f"{folder}/ertacache.json"))
    return paths


def vae_decode_time() -> float:
    """Seconds of one decode of the real-size latent by Wan2.1's VAE (random weights, bf16),
    CUDA events after a warm-up decode; the VAE is freed on return."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan().to("cuda", torch.bfloat16).eval()
    latent = torch.randn(1, 16, *LATENT.values(), device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        vae.decode(latent)
        seconds = cuda_time(lambda: vae.decode(latent))
    print(f"VAE decode: {seconds:.2f} s", flush=True)
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--set", choices=list(SETS), default="fixed",
                        help="fixed: fixed-interval; policies: every cadence policy at budget 0.4; peers: diffusers' "
                             "hooks; sparse: the 3D window at densities 0.5 / 0.25 / 0.1; patterns: the others at 0.1; "
                             "quant: the bit-reduction modes and torchao's peers; composed: compile and the composed "
                             "recipes against diffusers' MagCache")
    parser.add_argument("--recipes", nargs="+", default=None, help="instead of --set")
    parser.add_argument("--calibration-dir", default="/tmp/cadence-calibration")
    parser.add_argument("--calibration-steps", type=int, default=None,
                        help="steps of the calibration run (default: --steps); curves are resampled to --steps")
    parser.add_argument("--vae", action="store_true", help="also time the VAE decode, and give end-to-end figures")
    parser.add_argument("--out", default="wan_realsize.json")
    args = parser.parse_args()
    recipes = args.recipes or SETS[args.set]
    # Each distinct recipe compiles the block again (other modules inside it); dynamo's
    # default of 8 graphs per function would turn the later ones eager in a long sweep.
    torch._dynamo.config.recompile_limit = 64

    torch.manual_seed(0)
    with torch.device("cuda"):
        transformer = cast_like_from_pretrained(WanTransformer3DModel(**WAN_1_3B), torch.bfloat16).eval()
    pipe = RefVideoPipeline(transformer=transformer, scheduler=reference_model("ref-video").scheduler())
    pipe.set_progress_bar_config(disable=True)
    embeds = torch.randn(1, TEXT_TOKENS, 4096, device="cuda", dtype=torch.bfloat16)
    negative = torch.randn(1, TEXT_TOKENS, 4096, device="cuda", dtype=torch.bfloat16)
    call = dict(prompt_embeds=embeds, negative_prompt_embeds=negative, guidance_scale=args.guidance_scale, **LATENT)
    tokens = LATENT["frames"] * LATENT["height"] * LATENT["width"] // 4

    def forward():
        x = torch.randn(1, 16, *LATENT.values(), device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            transformer(hidden_states=x, timestep=torch.tensor([500.0], device="cuda"), encoder_hidden_states=embeds)

    began = time.time()
    pipe(steps=2, **call)  # warm-up: kernels, cuDNN/cuBLAS handles, allocator
    forward_s = min(cuda_time(forward) for _ in range(3))
    attention_s = attention_time(WAN_1_3B["num_attention_heads"], WAN_1_3B["attention_head_dim"], tokens,
                                 len(transformer.blocks))
    attention_share = attention_s / forward_s
    linear_s = min(linear_time(transformer, forward) for _ in range(2))
    linear_share = linear_s / forward_s
    vae_s = vae_decode_time() if args.vae else None
    torch.cuda.empty_cache()  # the VAE's activations, before the timed runs
    needed = {name for name in ("teacache", "magcache", "ertacache") if any("{" + name + "}" in r for r in recipes)}
    calibration_began = time.time()
    paths = calibrate(pipe, call, args.calibration_steps or args.steps, needed, args.calibration_dir) if needed else {}
    calibration_s = time.time() - calibration_began
    results = []
    baseline_s = None
    for template in recipes:
        text = template.format(steps=args.steps, **paths)
        allocated = torch.cuda.memory_allocated()
        acceleration = cadence.accelerate(pipe, text)
        weights_gib = (torch.cuda.memory_allocated() - allocated) / 2**30  # < 0: weight memory freed
        # Compile blocks and FlexAttention, tune Triton kernels before timing; diffusers'
        # MagCache counts steps itself and runs only the number it was set up for.
        if text != "baseline" and "diffusers-magcache" not in text:
            pipe(steps=5, **call)  # 5: a budget of 0.2 needs at least 5 steps
        timer = ForwardTimer(transformer)
        torch.cuda.reset_peak_memory_stats()
        seconds = cuda_time(lambda: pipe(steps=args.steps, **call))
        stats = acceleration.stats()
        acceleration.remove()
        baseline_s = baseline_s or seconds
        fraction = work_fraction(stats, ForwardShares(attention_share, linear_share), acceleration.recipe) or 1.0
        results.append({
            "recipe": display(template, args.steps),
            "seconds": seconds, "per_step_ms": 1000 * seconds / args.steps,
            "speedup": baseline_s / seconds, "compute_fraction": fraction, "ideal_speedup": 1 / fraction,
            **{k: stats[k] for k in ("density", "attention_fraction", "heads", "linear_bytes", "linear_bytes_float",
                                     "weight_memory_saved") if k in stats},
            "weight_memory_change_gib": weights_gib,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
            **timer.split(stats.get("schedule") or {}),
        })
        if vae_s is not None:  # what the user waits for, the text encoder aside
            results[-1]["end_to_end_s"] = seconds + vae_s
            results[-1]["end_to_end_speedup"] = (baseline_s + vae_s) / (seconds + vae_s)
        print(json.dumps(results[-1]), flush=True)
        with open(args.out + ".partial", "w") as f:  # what finished survives a time-out
            json.dump(results, f, indent=1)

    meta = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": date.today().isoformat(),
        "config": "Wan2.1-1.3B size, random weights, bf16", "tokens": tokens, "steps": args.steps,
        "cfg": True, "guidance_scale": args.guidance_scale, "one_forward_ms": 1000 * forward_s,
        "self_attention_ms": 1000 * attention_s, "attention_share": attention_share,
        "linear_ms": 1000 * linear_s, "linear_share": linear_share,
        "calibration_s": calibration_s, "wall_s": time.time() - began, "vae_decode_s": vae_s,
    }
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"\n{meta['device']}, torch {meta['torch']}, {tokens} tokens, {args.steps} steps with CFG; "
          f"one forward {meta['one_forward_ms']:.0f} ms, of which self-attention {meta['self_attention_ms']:.0f} ms")
    print(f"{'recipe':<44} {'seconds':>8} {'speedup':>8} {'ideal':>6} {'achieved/ideal':>15} {'reused fwd ms':>14} "
          f"{'peak GiB':>9}")
    for r in results:
        reused = f"{r['reused_forward_ms']:.1f}" if "reused_forward_ms" in r else "-"
        print(f"{r['recipe']:<44} {r['seconds']:>8.2f} {r['speedup']:>7.2f}x {r['ideal_speedup']:>5.2f}x "
              f"{r['speedup'] / r['ideal_speedup']:>14.0%} {reused:>14} {r['peak_mem_gib']:>9.1f}")


if __name__ == "__main__":
    main()
