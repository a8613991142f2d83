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

``--student-steps K`` adds a few-step student (issue 17, item 4): the same transformer run K steps
without CFG (guidance 1, one forward per step; random weights cost what a distilled student's
do), alone and with each of ``--student-recipes`` (default: compile + fp8 + SageAttention, the
per-forward part of Wan's default recipe with FP8; a K-step student takes no step policy). Every
row's ``speedup`` is against the first ``--recipes`` row (the teacher, 50 steps with CFG) of the
same run; a student row also gives ``ideal_speedup``: the ratio of forwards (100 / K, 25x for 4
steps) over the work its recipe leaves (``work_fraction``).

``--timed-steps N`` times the teacher rows on N of their ``--steps`` steps and scales the time to
``--steps`` (``seconds`` = the N-step loop x steps / N; the raw time is ``timed_seconds``): without
a step technique a step costs the same at every timestep (two forwards of a fixed shape and one
scheduler update). A recipe with a step technique (caching: its cost depends on where its
budget falls in the schedule) is still timed on all ``--steps``.

    bash benchmarks/gpu/run.sh --timeout 200 wan_realsize.py --recipes baseline --timed-steps 10 \
        --student-steps 4 --vae --out $OUT/wan_student.json

The teacher's shipped default beside them (timed on all 50 steps, a caching term): add
``"magcache(budget=0.3, calibration='{magcache}') + compile + attention-backend(backend='sage')"``
to ``--recipes`` with ``--calibration-steps 10``.

``--tiny`` runs the same code on the CPU (a 2-block config, float32, 2 x 8 x 8 latents, 8 text
tokens, host clock instead of CUDA events, compile on aot_eager): the CPU check of this script,
a few seconds.

    PYTHONPATH=src python benchmarks/wan_realsize.py --tiny --recipes baseline --steps 6 --timed-steps 3 \
        --student-steps 2 --vae --out /tmp/wan_tiny.json
"""

from __future__ import annotations

import argparse
import functools
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
# The few-step student's recipes (it runs alone first): the per-forward part of Wan's default
# (compile + SageAttention; `cadence recipes --model wan`) with FP8, issue 17's composition.
STUDENT_RECIPES = [f"compile + fp8 + {SAGE}"]
# --tiny: Wan's layout at 2 blocks and small widths (parallel_realsize.py's tiny config).
TINY = dict(WAN_1_3B, num_attention_heads=4, attention_head_dim=64, text_dim=32, freq_dim=32, ffn_dim=64,
            num_layers=2, rope_max_seq_len=64)
TINY_LATENT = {"frames": 2, "height": 8, "width": 8}
TINY_TEXT_TOKENS = 8
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


def vae_decode_time(latent_size: dict = LATENT, device="cuda", dtype=torch.bfloat16) -> float:
    """Seconds of one decode of the real-size latent by Wan2.1's VAE (random weights, bf16),
    CUDA events after a warm-up decode; the VAE is freed on return."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan().to(device, dtype).eval()
    latent = torch.randn(1, 16, *latent_size.values(), device=device, dtype=dtype)
    with torch.no_grad():
        vae.decode(latent)
        seconds = cuda_time(lambda: vae.decode(latent))
    print(f"VAE decode: {seconds:.2f} s", flush=True)
    return seconds


def step_techniques(template: str) -> list[str]:
    """The step techniques a recipe names: their cost depends on the step count and the
    timestep, so a run of fewer steps does not give their per-step time."""
    from cadence.accel.registry import get_technique

    names = re.findall(r"(?:^|\+)\s*([A-Za-z][\w-]*)", template)
    return [name for name in names if name not in ("baseline", "none") and get_technique(name).config.level == "step"]


def check_args(parser: argparse.ArgumentParser, args) -> None:
    """Refuse, before the model is built, what the run could not measure."""
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: must be at least 1")
    if args.timed_steps is not None and not 1 <= args.timed_steps <= args.steps:
        parser.error(f"--timed-steps {args.timed_steps}: must be between 1 and --steps ({args.steps})")
    if args.student_steps is not None and args.student_steps < 1:
        parser.error(f"--student-steps {args.student_steps}: must be at least 1 (a student's step count)")


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
    parser.add_argument("--timed-steps", type=int, default=None,
                        help="time the --recipes rows without a step technique on this many steps, scaled to --steps")
    parser.add_argument("--student-steps", type=int, default=None,
                        help="also time a student of this many steps without CFG, alone and with --student-recipes")
    parser.add_argument("--student-recipes", nargs="*", default=STUDENT_RECIPES,
                        help="the student's recipes after it runs alone (default: compile + fp8 + sage)")
    parser.add_argument("--calibration-dir", default="/tmp/cadence-calibration")
    parser.add_argument("--calibration-steps", type=int, default=None,
                        help="steps of the calibration run (default: --steps); curves are resampled to --steps")
    parser.add_argument("--vae", action="store_true", help="also time the VAE decode, and give end-to-end figures")
    parser.add_argument("--tiny", action="store_true", help="the same code on the CPU: 2 blocks, float32, host clock")
    parser.add_argument("--out", default="wan_realsize.json")
    args = parser.parse_args()
    recipes = args.recipes or SETS[args.set]
    check_args(parser, args)
    if args.tiny:  # torch.cuda's events and synchronize on the host clock: the timing code runs unchanged
        from unittest import mock

        from families_realsize import HOST_CLOCK  # imported here: it imports this module

        with mock.patch.multiple(torch.cuda, **HOST_CLOCK):
            run(args, recipes)
    else:
        run(args, recipes)


def run(args, recipes: list[str]) -> None:
    # Each distinct recipe compiles the block again (other modules inside it); dynamo's
    # default of 8 graphs per function would turn the later ones eager in a long sweep.
    torch._dynamo.config.recompile_limit = 64
    device, dtype = ("cpu", torch.float32) if args.tiny else ("cuda", torch.bfloat16)
    config, latent = (TINY, TINY_LATENT) if args.tiny else (WAN_1_3B, LATENT)
    text_tokens = TINY_TEXT_TOKENS if args.tiny else TEXT_TOKENS

    torch.manual_seed(0)
    with torch.device(device):
        transformer = cast_like_from_pretrained(WanTransformer3DModel(**config), dtype).eval()
    pipe = RefVideoPipeline(transformer=transformer, scheduler=reference_model("ref-video").scheduler())
    pipe.set_progress_bar_config(disable=True)
    embeds, negative = (torch.randn(1, text_tokens, config["text_dim"], device=device, dtype=dtype) for _ in range(2))
    call = dict(prompt_embeds=embeds, negative_prompt_embeds=negative, guidance_scale=args.guidance_scale, **latent)
    # The student: one forward per step, no negative branch (guidance 1 turns CFG off).
    student_call = dict(prompt_embeds=embeds, guidance_scale=1.0, **latent)
    tokens = latent["frames"] * latent["height"] * latent["width"] // 4

    def forward():
        x = torch.randn(1, 16, *latent.values(), device=device, dtype=dtype)
        with torch.no_grad():
            transformer(hidden_states=x, timestep=torch.tensor([500.0], device=device), encoder_hidden_states=embeds)

    began = time.time()
    pipe(steps=2, **call)  # warm-up: kernels, cuDNN/cuBLAS handles, allocator
    forward_s = min(cuda_time(forward) for _ in range(3))
    attention_s = attention_time(config["num_attention_heads"], config["attention_head_dim"], tokens,
                                 len(transformer.blocks), device=device, dtype=dtype)
    attention_share = attention_s / forward_s
    linear_s = min(linear_time(transformer, forward) for _ in range(2))
    linear_share = linear_s / forward_s
    vae_s = vae_decode_time(latent, device, dtype) if args.vae else None
    torch.cuda.empty_cache()  # the VAE's activations, before the timed runs
    student_recipes = ["baseline", *args.student_recipes] if args.student_steps else []
    if args.tiny:  # no Inductor on a CPU test: the same graph capture, run eagerly
        recipes, student_recipes = ([re.sub(r"\bcompile\b(?!\s*\()", "compile(backend='aot_eager')", r) for r in rs]
                                    for rs in (recipes, student_recipes))
    needed = {name for name in ("teacache", "magcache", "ertacache")
              if any("{" + name + "}" in r for r in recipes + student_recipes)}
    calibration_began = time.time()
    paths = calibrate(pipe, call, args.calibration_steps or args.steps, needed, args.calibration_dir) if needed else {}
    calibration_s = time.time() - calibration_began
    cfg = args.guidance_scale > 1.0
    teacher_forwards = args.steps * (2 if cfg else 1)
    # (who, recipe, steps reported, steps timed, the call): the teacher rows first, the first is the reference.
    plan = [("teacher", r, args.steps, args.steps if step_techniques(r) else args.timed_steps or args.steps, call)
            for r in recipes]
    plan += [("student", r, args.student_steps, args.student_steps, student_call) for r in student_recipes]
    shares = ForwardShares(attention_share, linear_share)
    results = []
    baseline_s = None
    for model, template, steps, timed_steps, model_call in plan:
        text = template.format(steps=steps, **paths)
        allocated = torch.cuda.memory_allocated()
        acceleration = cadence.accelerate(pipe, text)
        weights_gib = (torch.cuda.memory_allocated() - allocated) / 2**30  # < 0: weight memory freed
        # Compile blocks and FlexAttention, tune Triton kernels before timing; diffusers'
        # MagCache counts steps itself and runs only the number it was set up for.
        if text != "baseline" and "diffusers-magcache" not in text:
            pipe(steps=5, **model_call)  # 5: a budget of 0.2 needs at least 5 steps
        timer = ForwardTimer(transformer)
        torch.cuda.reset_peak_memory_stats()
        timed_s = cuda_time(functools.partial(pipe, steps=timed_steps, **model_call))
        stats = acceleration.stats()
        acceleration.remove()
        seconds = timed_s * steps / timed_steps  # no step technique: every step costs the same
        baseline_s = baseline_s or seconds
        forwards = steps * (2 if model_call["guidance_scale"] > 1.0 else 1)
        fraction = work_fraction(stats, shares, acceleration.recipe) or 1.0
        results.append({
            "model": model, "recipe": display(template, steps), "steps": steps, "forwards": forwards,
            "timed_steps": timed_steps, "timed_seconds": timed_s, "seconds": seconds,
            "per_step_ms": 1000 * timed_s / timed_steps, "speedup": baseline_s / seconds,
            # Ideal: fewer forwards (100 / K for a K-step student), times what the recipe leaves of each.
            "forward_ratio": teacher_forwards / forwards, "compute_fraction": fraction,
            "ideal_speedup": teacher_forwards / forwards / fraction,
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
        "device": "cpu (--tiny)" if args.tiny else torch.cuda.get_device_name(), "torch": torch.__version__,
        "date": date.today().isoformat(),
        "config": "tiny (2 blocks), random weights, float32" if args.tiny else "Wan2.1-1.3B size, random weights, bf16",
        "tokens": tokens, "steps": args.steps, "timed_steps": args.timed_steps or args.steps,
        "student_steps": args.student_steps, "cfg": cfg, "guidance_scale": args.guidance_scale,
        "one_forward_ms": 1000 * forward_s, "self_attention_ms": 1000 * attention_s,
        "attention_share": attention_share, "linear_ms": 1000 * linear_s, "linear_share": linear_share,
        "calibration_s": calibration_s, "wall_s": time.time() - began, "vae_decode_s": vae_s,
    }
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    timed = f" (timed on {meta['timed_steps']}, scaled)" if meta["timed_steps"] < args.steps else ""
    print(f"\n{meta['device']}, torch {meta['torch']}, {tokens} tokens, {args.steps} steps with{'' if cfg else 'out'} "
          f"CFG{timed}; one forward {meta['one_forward_ms']:.0f} ms, of which self-attention "
          f"{meta['self_attention_ms']:.0f} ms")
    print(f"{'model':<8} {'recipe':<44} {'fwds':>5} {'seconds':>8} {'speedup':>8} {'ideal':>7} {'achieved/ideal':>15} "
          f"{'reused fwd ms':>14} {'peak GiB':>9}{'  end-to-end' if vae_s is not None else ''}")
    for r in results:
        reused = f"{r['reused_forward_ms']:.1f}" if "reused_forward_ms" in r else "-"
        e2e = f" {r['end_to_end_s']:>7.2f} s {r['end_to_end_speedup']:>6.2f}x" if vae_s is not None else ""
        print(f"{r['model']:<8} {r['recipe']:<44} {r['forwards']:>5} {r['seconds']:>8.2f} {r['speedup']:>7.2f}x "
              f"{r['ideal_speedup']:>6.2f}x {r['speedup'] / r['ideal_speedup']:>14.0%} {reused:>14} "
              f"{r['peak_mem_gib']:>9.1f}{e2e}")


if __name__ == "__main__":
    main()
