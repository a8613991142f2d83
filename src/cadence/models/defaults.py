"""The default fast recipe of each family (``cadence recipes --model FAMILY``).

Chosen by one rule from two measurements (benchmarks/RESULTS.md, "Composed recipes"): the
fastest composition at the real size whose fidelity on the family's reference model stays
at or above 35 dB PSNR against the unaccelerated output at the benchmark's step count.

- Step reuse: MagCache in budget mode is the best cadence policy on both reference models'
  frontiers. On ref-video at 50 steps budget 0.3 gives 36.1 dB (0.25: 32.4 dB), composed with
  compile and low-precision attention.
- compile costs no fidelity (99 dB: float rounding) and gave 1.19-1.37x on every family
  measured at its real size.
- SageAttention-style attention keeps 47.6 dB on ref-video (with compile). It is left out where the
  family's attention always carries a mask (HunyuanVideo's padded text), since the kernel
  then falls back to SDPA, and where attention is a small share (FLUX: 15 % at 1024^2).
- FP8 linears are left out: 32.5 dB on ref-video alone, below the bar.
- Image families: ref-image was measured at 20 steps only, where MagCache at budget 0.5 gives
  34.9 dB, 0.1 dB under the bar (0.65: 41.2 dB); kept at 0.5, since reuse loses less at the
  28-50 steps FLUX and SD3 run (on ref-video budget 0.4 gives 32.0 dB at 20 steps, 42.8 at 50).
"""

from __future__ import annotations

from dataclasses import dataclass

from cadence.models import FAMILIES

SAGE = "attention-backend(backend='sage')"


@dataclass(frozen=True)
class FamilyRecipe:
    recipe: str
    measured: str  # what supports it, with the RESULTS.md figures
    needs: str = "a MagCache calibration of the model: cadence calibrate --model DIR --technique magcache"


_VIDEO = FamilyRecipe(
    f"magcache(budget=0.3) + compile + {SAGE}",
    "Wan2.1-1.3B size, 480p x 81, 50 steps with CFG, H100: 4.26x over diffusers bf16 (2.48x for diffusers' "
    "MagCache); ref-video, 50 steps: 36.1 dB",
)
DEFAULT_RECIPES: dict[str, FamilyRecipe] = {
    "wan": _VIDEO,
    "cogvideox": FamilyRecipe(_VIDEO.recipe, "compile alone 1.19x at CogVideoX-2B size (480 x 720 x 49, H100); "
                              "the composition measured on Wan only"),
    "ltx": FamilyRecipe(_VIDEO.recipe, "not measured at LTX-Video's size; the Wan composition"),
    "hunyuan_video": FamilyRecipe(
        "magcache(budget=0.3) + compile",
        "compile alone 1.24x at HunyuanVideo size (480 x 848 x 61, H100); its attention masks the padded text, "
        "where low-precision attention falls back to SDPA"),
    "flux": FamilyRecipe(
        "magcache(budget=0.5) + compile",
        "compile alone 1.37x at FLUX.1-dev size (1024^2, H100); ref-image magcache(budget=0.5): 34.9 dB at 20 steps"),
    "sd3": FamilyRecipe("magcache(budget=0.5) + compile", "not measured at SD3's size; the FLUX composition"),
}
# The reference models are small configs of the Wan and FLUX classes.
ALIASES = {"ref-video": "wan", "ref-image": "flux", **{cls: family for cls, (family, _) in FAMILIES.items()}}


def default_recipe(family: str) -> FamilyRecipe:
    """The default fast recipe of a family, by family name, model class name or reference model."""
    name = ALIASES.get(family, family)
    if name not in DEFAULT_RECIPES:
        valid = sorted(DEFAULT_RECIPES) + sorted(a for a in ALIASES if a.startswith("ref-"))
        raise ValueError(f"no default recipe for {family!r}; valid: {', '.join(valid)} (or a model class name)")
    return DEFAULT_RECIPES[name]
