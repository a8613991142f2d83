"""The defaults of each family, and how they were chosen: its fast recipe (``cadence recipes
--model FAMILY``) and its sparse pattern. Each family's file holds its own (with what
supports it); the ones several families share are here.

Recipes: chosen by one rule from two measurements (benchmarks/RESULTS.md, "Composed
recipes and regional compilation"): the fastest composition at the real size whose fidelity
on the family's reference model stays at or above 35 dB PSNR against the unaccelerated
output at the benchmark's step count.

- Step reuse: MagCache in budget mode is the best cadence policy on both reference models'
  frontiers; budget 0.3 is the smallest that keeps ref-video above the bar at 50 steps,
  composed with compile and low-precision attention.
- compile costs no fidelity (float rounding only) and speeds up every family measured at
  its real size.
- SageAttention-style attention keeps ref-video far above the bar. It is left out where the
  family's attention always carries a mask (HunyuanVideo's padded text), since the kernel
  then falls back to SDPA, and where attention is a small share of the forward (FLUX).
- FP8 linears are left out: alone they take ref-video below the bar.
- Image families: ref-image was measured at 20 steps only, where MagCache at budget 0.5 sits
  a tenth of a dB under the bar; kept at 0.5, since reuse loses less at the 28-50 steps FLUX
  and SD3 run (as it does on ref-video between 20 and 50 steps).

Sparse patterns: read off the reference-model frontiers (benchmarks/RESULTS.md, "Sparse
attention"): on ref-video (Wan) the per-head router is the best pattern at every density
swept; on ref-image (FLUX) the static 3D window ties the best at 0.5 and costs least at run
time. Density 0.5, since at 0.25 the best pattern loses several more dB on both.

Video families (Wan, CogVideoX, HunyuanVideo, LTX) follow Wan's measurements, image
families (FLUX, SD3) FLUX's.
"""

from __future__ import annotations

from pathlib import Path

from cadence.models.family import FamilyRecipe, families, find_family

SAGE = "attention-backend(backend='sage')"
VIDEO_RECIPE = f"magcache(budget=0.3) + compile + {SAGE}"
IMAGE_RECIPE = "magcache(budget=0.5) + compile"
VIDEO_PATTERN = "sparse-router(density=0.5)"
IMAGE_PATTERN = "sparse-window(density=0.5)"
# A recipe `cadence tune --save-default` wrote beside a checkpoint: that checkpoint's default.
TUNED_RECIPE = "cadence-recipe.toml"


def default_recipe(family: str) -> FamilyRecipe:
    """The default fast recipe of a family, by family name, model class name or reference model;
    of a checkpoint directory holding a tuned recipe (``TUNED_RECIPE``), that recipe."""
    tuned = Path(family) / TUNED_RECIPE
    if tuned.is_file():
        # the file is the recipe (--recipe takes a .toml path); its first line says how it was measured
        first = tuned.read_text().splitlines()[0]
        return FamilyRecipe(str(tuned), first.lstrip("# ") if first.startswith("#") else "tuned by cadence tune",
                            needs="nothing more: the calibrations it reads are named in it")
    found = find_family(family)
    if found is None:
        registered = families()
        valid = sorted(f.name for f in registered) + sorted(ref for f in registered for ref in f.references)
        raise ValueError(f"no default recipe for {family!r}; valid: {', '.join(valid)} (or a model class name)")
    return found.recipe
