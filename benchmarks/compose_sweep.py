"""Composed recipes on a reference model at the real-size benchmark's step count: fidelity
(PSNR / SSIM against the unaccelerated model, the held-out prompts and seeds of
``cache_sweep.py``) of compile, of cadence's composed recipes and of diffusers' hooks, so
that a speed measured at the Wan2.1-1.3B size (``wan_realsize.py --set composed``) is
compared with a peer at equal or better fidelity.

    python benchmarks/compose_sweep.py --model ref-video --steps 50 --embeddings \\
        .carry/heldout-embeddings.safetensors --out $OUT/compose-video
"""

from __future__ import annotations

import torch
from cache_sweep import main
from quant_sweep import SAGE

PEERS = [  # {steps}: the run's, filled in by cache_sweep
    "diffusers-magcache(steps={steps})", "diffusers-magcache(threshold=0.12, steps={steps})",
    "diffusers-fbcache(threshold=0.1)", "diffusers-fbcache(threshold=0.2)",
]
COMPOSED = [
    *(f"magcache(budget={b})" for b in (0.2, 0.25, 0.3)), "compile", f"compile + {SAGE}", f"compile + fp8 + {SAGE}",
    *(f"magcache(budget={b}) + compile + {SAGE}" for b in (0.2, 0.25, 0.3)),
    f"magcache(budget=0.25) + compile + fp8 + {SAGE}",
]


if __name__ == "__main__":
    torch._dynamo.config.recompile_limit = 64  # one graph per distinct recipe (see wan_realsize.py)
    main(default_recipes=lambda: PEERS + COMPOSED, description=__doc__)
