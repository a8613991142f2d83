"""Timing on a busy CPU: the same small bench on an idle CPU and on one another process
loads, speedups side by side.

The load is busy-loop subprocesses (``--load-cores`` of them), each bounded in time: it exits
after ``--load-seconds`` whatever happens to this script. ``--load steady`` keeps them on for
the whole busy run; ``--load step`` keeps them on for the first ``--period`` seconds and then
stops them (another process that ends partway: the case in which timing every baseline first
and the recipes after went wrong, 4.31x against an ideal of 2.50x); ``--load cycle`` switches
them on and off every ``--period`` seconds, a load that changes all the time. With
``--sequential`` the busy run is also timed in that old order (all baselines, then each
recipe, under a fresh load of the same kind), to show what interleaving corrects.

    python benchmarks/busy_cpu.py --model ref-video --steps 8 --prompts 2 \\
        --recipe "fixed-interval(interval=2)" --recipe "fixed-interval(interval=3)" --sequential

Prints, per recipe: its ideal, the idle and busy speedups, their relative difference, the
busy run's spread and rounds; writes ``busy_cpu.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import torch

from cadence import generation
from cadence.bench.runner import BenchSettings, default_prompts, run_bench, timed
from cadence.recipe import Recipe, accelerate

# One busy process: spins (or, in cycle mode, spins and sleeps in turns) until its deadline.
_BUSY = """
import sys, time
seconds, period, mode = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
start = time.monotonic()
while (elapsed := time.monotonic() - start) < seconds:
    idle = (mode == "cycle" and int(elapsed // period) % 2) or (mode == "step" and elapsed > period)
    if idle:
        time.sleep(0.05)
    else:
        sum(range(10_000))
"""


@contextmanager
def cpu_load(cores: int, seconds: float, period: float, mode: str):
    """``cores`` busy processes for at most ``seconds``; stopped on leaving the block."""
    processes = [subprocess.Popen([sys.executable, "-c", _BUSY, str(seconds), str(period), mode])
                 for _ in range(cores)]
    try:
        yield
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait()


def load_average() -> str:
    try:
        return " / ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def bench(args, recipes: list[Recipe], prompts: list[str], out: Path) -> dict[str, dict]:
    settings = BenchSettings(model=args.model, recipes=recipes, prompts=prompts, seeds=list(range(args.seeds)),
                             out=out, steps=args.steps, device="cpu", cache_dir=out / "cache",
                             command=" ".join(sys.argv))
    _, summary = run_bench(settings)
    return {s["recipe"]: s for s in summary}


def sequential(args, recipes: list[Recipe], prompts: list[str]) -> dict[str, float]:
    """The old order: every baseline timed first, then each recipe over every case; the load
    starts with the first timed baseline."""
    import cadence

    pipe = cadence.load(args.model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    size = generation.resolve_size(pipe)
    cases = [(prompt, seed) for prompt in prompts for seed in range(args.seeds)]

    def run(prompt, seed, steps=args.steps):
        return timed(lambda: generation.generate(pipe, prompt, steps=steps, seed=seed, guidance_scale=4.0,
                                                 size=size), "cpu")[1]

    run(*cases[0], steps=2)  # warm-up
    speedups = {}
    with cpu_load(args.load_cores, args.load_seconds, args.period, args.load):
        baseline = sum(run(*case) for case in cases)
        for recipe in recipes:
            with accelerate(pipe, recipe):
                speedups[str(recipe)] = baseline / sum(run(*case) for case in cases)
    return speedups


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ref-video")
    parser.add_argument("--recipe", action="append", default=None)
    parser.add_argument("--prompts", type=int, default=2, help="held-out prompts")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--load", choices=["steady", "step", "cycle"], default="step")
    parser.add_argument("--load-cores", type=int, default=1, help="busy processes")
    parser.add_argument("--period", type=float, default=30.0,
                        help="step: seconds on before the load ends; cycle: seconds on, then seconds off")
    parser.add_argument("--load-seconds", type=float, default=1800.0, help="the load's bound, whatever happens")
    parser.add_argument("--sequential", action="store_true", help="also time the busy run in the old order")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    out = args.out or Path(tempfile.mkdtemp(prefix="busy-cpu-"))
    recipes = [Recipe.parse(r) for r in (args.recipe or ["fixed-interval(interval=2)", "fixed-interval(interval=3)"])]
    prompts = default_prompts(args.model, "heldout", args.prompts)
    result = {"command": " ".join(["python", *sys.argv]), "date": date.today().isoformat(), "torch": torch.__version__,
              "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load": args.load,
              "load_cores": args.load_cores, "period_s": args.period}

    begin = time.perf_counter()
    result["load_average_before_idle"] = load_average()
    idle = bench(args, recipes, prompts, out / "idle")
    result["idle_s"] = time.perf_counter() - begin
    begin = time.perf_counter()
    with cpu_load(args.load_cores, args.load_seconds, args.period, args.load):
        result["load_average_before_busy"] = load_average()
        busy = bench(args, recipes, prompts, out / "busy")
        result["busy_s"] = time.perf_counter() - begin
    old = sequential(args, recipes, prompts) if args.sequential else {}

    rows = []
    header = (f"{'recipe':<30} {'ideal':>6} {'idle':>7} {'busy':>7} {'diff':>6} {'spread':>7} {'rounds':>6}"
              + (f" {'old order':>10}" if old else ""))
    print(header + "\n" + "-" * len(header))
    for name, busy_row in busy.items():
        idle_row = idle[name]
        difference = busy_row["speedup"] / idle_row["speedup"] - 1
        rows.append({"recipe": name, "ideal": idle_row["ideal_speedup"], "idle_speedup": idle_row["speedup"],
                     "busy_speedup": busy_row["speedup"], "difference": difference, "busy_spread": busy_row["spread"], "busy_rounds": busy_row["rounds"],
                     "idle_baseline_s": idle["baseline"]["latency_s"], "busy_baseline_s": busy["baseline"]["latency_s"],
                     "old_order_busy_speedup": old.get(name), "busy_flags": busy_row["flags"]})
        ideal = f"{idle_row['ideal_speedup']:.2f}" if idle_row["ideal_speedup"] else "-"
        line = (f"{name:<30} {ideal:>6} {idle_row['speedup']:>6.2f}x {busy_row['speedup']:>6.2f}x {difference:>+6.1%} "
                f"{busy_row['spread']:>7.0%} {busy_row['rounds']:>6}")
        print(line + (f" {old[name]:>9.2f}x" if name in old else ""))
    print(f"baseline generation: {idle['baseline']['latency_s']:.2f} s idle, {busy['baseline']['latency_s']:.2f} s busy")
    result["rows"] = rows
    out.mkdir(parents=True, exist_ok=True)
    (out / "busy_cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out / 'busy_cpu.json'}")


if __name__ == "__main__":
    main()
