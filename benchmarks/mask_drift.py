"""Dynamic masks reused across steps, with and without a drift-triggered rebuild: ref-video,
2 held-out prompts, seed 0, 20 steps, sparse-topk at density 0.5, PSNR against the
unaccelerated output per prompt, and the masks built for the second prompt (per layer, branch
and step). CPU: `PYTHONPATH=src python benchmarks/mask_drift.py` (a few minutes).
"""
import time

import cadence
from cadence.bench.metrics import psnr
from cadence.reference import data

pipe = cadence.load("ref-video")
pipe.set_progress_bar_config(disable=True)
prompts = data.heldout_prompts(2, video=True)
def run(recipe=None):
    outs, stats = [], None
    for p in prompts:
        if recipe is None:
            outs.append(pipe(prompt=p, steps=20, seed=0).frames[0]); continue
        with cadence.accelerate(pipe, recipe) as a:
            outs.append(pipe(prompt=p, steps=20, seed=0).frames[0]); stats = a.stats()
    return outs, stats
base, _ = run()
for recipe in ["sparse-topk(density=0.5)", "sparse-topk(density=0.5, mask_every=5)",
               "sparse-topk(density=0.5, mask_every=5, mask_drift=0.05)", "sparse-topk(density=0.5, mask_every=5, mask_drift=0.1)",
               "sparse-topk(density=0.5, mask_every=5, mask_drift=0.2)"]:
    t = time.time(); outs, st = run(recipe)
    print(f"{recipe:60s} builds {st['mask_builds']:4d} drift {st['drift_rebuilds']:4d}  PSNR " + " ".join(f"{psnr(o, b):.2f}" for o, b in zip(outs, base)), f"{time.time()-t:.0f}s", flush=True)
