"""Speed at the real size: ``cadence tune --speed-at wan2.1-1.3b``.

The search judges quality on the model it tunes (the reference models: 1,024 tokens, a
0.8-s generation on the H200), but there every per-forward technique (SageAttention, a
sparse pattern, FP8/INT8 linears) costs more in kernel launches than it saves, so a search
timed there can only ever choose step policies (benchmarks/RESULTS.md, "A 9-minute ref-video
run on the H200"). With ``speed_at`` a candidate's time is *modelled* at the real size:

    relative time = per_step_seconds(part) x computed_share / per_step_seconds(empty)

- ``part``: the candidate's per-forward techniques (every term whose level is not "step"),
  applied to the real-size transformer (random weights, bf16, on the tuning device) in the
  reference pipeline path, timed over ``SPEED_STEPS`` steps with CFG after one untimed
  warm-up generation (compilation and Triton autotuning happen there); cached per part. A
  measure is stopped, at its next forward, once it runs past the deadline its caller gives
  (what the time budget leaves it): ``OutOfTime``, the part left unmeasured.
- ``computed_share``: the candidate's ``compute_fraction`` measured on the tuned model's
  cases (the share of the block work its step policy computes; 1.0 without one).

What the model leaves out, and so where it is approximate:
- the reused forwards' own cost (a step policy's indicator and the residual it adds back: a
  few milliseconds against hundreds for a computed forward at the real size,
  benchmarks/RESULTS.md, "Composed recipes and regional compilation" and "What the user
  waits for");
- a forward's non-block work (embeddings, final layer), which ``compute_fraction`` does not
  count: the model scales it by the block share, though it runs in every forward, reused
  ones included (it is part of a reused forward's cost above);
- the step policy's hooks around the blocks while the part runs: a compiled part is traced
  without them, as the recipe is not;
- a per-forward technique whose cost changes with the step: a sparse pattern's dense first
  steps are a share of the steps, the same at ``SPEED_STEPS`` as at the run's step count
  only up to rounding to whole steps;
- which steps a step policy computes. ``ratio x share`` assumes they are typical steps, but
  they are mostly the early ones (the warm-up steps every policy computes, where the
  output moves most), and a sparse pattern runs its first ``dense_fraction`` of the steps
  dense. So a sparse pattern composed with a step policy spends a larger share of its
  computed steps dense than the part's timing (dense steps spread over all steps) assumes:
  a known bias, modelled too fast, largest for a sparse pattern with a small step budget.
  A per-forward part that costs the same at every step (quantized linears, a dense
  attention backend) has no such bias.

Calibrated parts are timed in their calibration-free form (``calibration_free``): a
calibration is made for the tuned model, and ``accel.calibration.load`` refuses it on any
other (and the real size's random weights have none of their own). The fields pointing at a
calibration or at saved weights are cleared (the weights are quantized on the fly instead,
to the same kernels), and the knobs that need one take their calibration-free values
(``CALIBRATION_FREE``: those ``QuantConfig.needs_calibration`` reads):

- ``smooth`` -> 0 (SmoothQuant off). On the GPU the division by the smoothing factors runs
  inside the one-pass activation quantizer (``accel/quant/_kernels.py``; compiled, inductor
  fuses it likewise), one load of a K-vector per row: expected within the timing's noise (not
  measured apart). On a path that does not fuse it (the reference path, an FP4 layer's
  low-rank branch) it is one elementwise pass over the linear's input more: the part is timed
  at most that much too fast.
- ``activations`` -> ``dynamic``. The fused quantizer computes each row's absolute maximum
  in both forms (the NaN/Inf check reads it), so a static scale saves only the store of the
  per-row scales, and on ``torch._scaled_mm`` a per-tensor instead of a row-wise scale; on
  an unfused path, one row reduction. The part is timed at most that much too slow.

The two errors go opposite ways and, by this arithmetic, are small next to the 8-bit GEMMs
themselves (neither is measured apart). A part with no calibration-free form (``mixed``: its
sensitivity calibration decides which format each linear takes) is refused at the real size,
its message naming the calibration; ``timable`` says so from its registration, and the search
space leaves it out with ``--speed-at`` (``space.SearchSpace.from_registry``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers import FluxTransformer2DModel, WanTransformer3DModel

from cadence.accel.quant.calibration import ACTIVATION_RANGES
from cadence.accel.registry import Technique, TechniqueConfig, get_technique
from cadence.bench.runner import timed
from cadence.models.real_configs import (
    FLUX_DEV,
    FLUX_SIDE,
    FLUX_TEXT_TOKENS,
    WAN_1_3B,
    WAN_LATENT,
    WAN_TEXT_TOKENS,
    cast_like_from_pretrained,
)
from cadence.recipe import Recipe, accelerate
from cadence.tune.evaluate import Deadline, TooSlow

# Steps of the timed generation: the per-step time of a real-size generation, with the
# launch and allocation costs of its first step spread over several (a 50-step timing would
# cost 10 times more per candidate part).
SPEED_STEPS = 5
STEP_LEVEL = "step"
# Fields that point at a file made for the tuned model: a calibration, or weights saved
# quantized (besides a field named after the technique's calibration store, mixed's
# ``sensitivity``). Cleared at the real size.
POINTER_FIELDS = ("calibration", "checkpoint")
# The knobs that need the activation calibration (QuantConfig.needs_calibration), set to the
# value that needs none: SmoothQuant off, activation scales per token.
CALIBRATION_FREE = {"smooth": 0.0, "activations": "dynamic"}
# The calibration stores every use of which CALIBRATION_FREE's knobs turn off: the activation
# ranges (SmoothQuant's factors, static scales). A per-forward technique calibrated into any other
# store (mixed's sensitivity: which format each linear takes) has no calibration-free form.
CALIBRATION_FREE_STORES = (ACTIVATION_RANGES.store,)


@dataclass(frozen=True)
class RealSize:
    """A real-size transformer to time candidates on, built with random weights."""

    name: str
    transformer_cls: type
    config: dict
    size: dict  # the reference pipeline's size arguments (its latent: frames, height, width)
    text_tokens: int
    text_dim: int
    pooled_dim: int | None = None  # image pipelines: the pooled text embedding's width
    described: str = ""

    @property
    def video(self) -> bool:
        return "frames" in self.size

    def build(self, device: str, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
        """The transformer, the same random weights every time, drawn without moving the
        caller's random streams (the tune's own candidates and generations draw from them)."""
        devices = [device] if device.startswith("cuda") else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)
            with torch.device(device):
                return cast_like_from_pretrained(self.transformer_cls(**self.config), dtype).eval()


# name -> what ``--speed-at`` builds (tests register tiny ones). FLUX.1-dev is built without
# its guidance embedder: the reference image pipeline passes no guidance value, and that
# embedder is one small MLP per forward, next to 57 blocks at 4,608 tokens.
SPECS: dict[str, RealSize] = {
    "wan2.1-1.3b": RealSize(
        "wan2.1-1.3b",
        WanTransformer3DModel,
        WAN_1_3B,
        WAN_LATENT,
        WAN_TEXT_TOKENS,
        WAN_1_3B["text_dim"],
        described="Wan2.1-T2V-1.3B, 480 x 832 x 81 frames (32,760 tokens)",
    ),
    "flux.1-dev": RealSize(
        "flux.1-dev",
        FluxTransformer2DModel,
        {**FLUX_DEV, "guidance_embeds": False},
        {"height": 2 * FLUX_SIDE, "width": 2 * FLUX_SIDE},
        FLUX_TEXT_TOKENS,
        FLUX_DEV["joint_attention_dim"],
        FLUX_DEV["pooled_projection_dim"],
        described="FLUX.1-dev, 1024 x 1024 (4,096 image + 512 text tokens)",
    ),
}


def spec(name: str) -> RealSize:
    if name not in SPECS:
        raise ValueError(
            f"--speed-at {name!r} is not a known real size; valid: "
            + ", ".join(f"{key} ({value.described or value.transformer_cls.__name__})" for key, value in SPECS.items())
        )
    return SPECS[name]


def check_family(name: str, transformer: torch.nn.Module | type) -> None:
    """Refuse timing a model (a transformer or its class) at the real size of another family's."""
    wanted, given = (
        spec(name).transformer_cls,
        transformer if isinstance(transformer, type) else type(transformer),
    )
    if not issubclass(given, wanted):
        valid = ", ".join(key for key, value in SPECS.items() if issubclass(given, value.transformer_cls)) or "none"
        raise TypeError(
            f"--speed-at {name} times a {wanted.__name__}, but the tuned model's transformer is a "
            f"{given.__name__}; valid for it: {valid}"
        )


def per_forward_part(recipe: Recipe) -> Recipe:
    """The techniques of ``recipe`` that change a forward's cost (every level but the step's),
    each in its calibration-free form: what is timed at the real size."""
    return Recipe(calibration_free(config) for config in recipe.techniques if config.level != STEP_LEVEL)


def calibration_free(config: TechniqueConfig) -> TechniqueConfig:
    """``config`` reading no file made for the tuned model: its pointer fields at their
    defaults (''), its ``CALIBRATION_FREE`` knobs at those values (see the module docstring
    for what that changes in its cost)."""
    params = config.params()
    calibration = get_technique(config.name).calibration
    pointers = {*POINTER_FIELDS, *([calibration.store] if calibration else [])}
    defaults = {f.name: f.default for f in config.fields()}
    changed = {
        **{name: defaults[name] for name in pointers if name in params},
        **{name: value for name, value in CALIBRATION_FREE.items() if name in params},
    }
    return type(config).from_params({**params, **changed})


def timable(technique: Technique) -> bool:
    """Whether ``technique`` can be timed at a real size: a step policy is not timed there (its
    share of the block work is measured on the tuned model); a per-forward technique needs no
    calibration, or only one its calibration-free form drops (``CALIBRATION_FREE_STORES``)."""
    calibration = technique.calibration
    return technique.config.level == STEP_LEVEL or calibration is None or calibration.store in CALIBRATION_FREE_STORES


class OutOfTime(RuntimeError):
    """A measure stopped at its deadline. A RuntimeError, so that where nothing handles it (the
    confirmation, the held-out check) it fails the one recipe, as a part that cannot run does."""


@dataclass
class PartTime:
    part: str  # the per-forward part ('' for the baseline)
    per_step_seconds: float
    warm_up_seconds: float


@dataclass
class SpeedAt:
    """The real-size transformer of ``spec``, kept on ``device`` for the whole run, and the
    measured per-step time of each per-forward part asked for."""

    spec: RealSize
    device: str
    guidance_scale: float
    dtype: torch.dtype = torch.bfloat16
    progress: Callable[[str], None] = print
    measured: dict[str, PartTime] = field(default_factory=dict)

    def __post_init__(self):
        from cadence.reference.models import reference_model
        from cadence.reference.pipelines import RefImagePipeline, RefVideoPipeline

        self.progress(
            f"speed at {self.spec.name}: building the transformer (random weights, {self.dtype}) on {self.device}"
        )
        transformer = self.spec.build(self.device, self.dtype)
        reference, pipeline = ("ref-video", RefVideoPipeline) if self.spec.video else ("ref-image", RefImagePipeline)
        self.pipe = pipeline(transformer=transformer, scheduler=reference_model(reference).scheduler())
        self.pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(0)

        def text(*shape):  # random embeddings of the real text length
            return torch.randn(*shape, generator=generator).to(self.device, self.dtype)

        self.call = {
            "prompt_embeds": text(1, self.spec.text_tokens, self.spec.text_dim),
            "negative_prompt_embeds": text(1, self.spec.text_tokens, self.spec.text_dim),
            "guidance_scale": self.guidance_scale,
            **self.spec.size,
        }
        if not self.spec.video:
            self.call.update(
                pooled_prompt_embeds=text(1, self.spec.pooled_dim),
                negative_pooled_prompt_embeds=text(1, self.spec.pooled_dim),
            )

    def per_step_seconds(self, part: Recipe, deadline: float | None = None) -> float:
        """Seconds per step of a ``SPEED_STEPS``-step generation under ``part`` (its per-forward
        techniques; measured once per part, then read from the cache). A new measure (warm-up
        and timed steps together) running past ``deadline`` seconds is stopped at its next
        forward and raises ``OutOfTime``; the part stays unmeasured."""
        part = per_forward_part(part)
        key = self._key(part)
        if key not in self.measured:
            try:
                with Deadline(self.pipe.transformer, deadline):
                    self.measured[key] = self._measure(part, key)
            except TooSlow as slow:
                raise OutOfTime(
                    f"measuring {key or 'the baseline'} at {self.spec.name} was stopped after {slow.seconds:.1f} s, "
                    f"past the {deadline:.1f} s the time budget left it"
                ) from None
        return self.measured[key].per_step_seconds

    def is_measured(self, part: Recipe) -> bool:
        """Whether the per-forward part of ``part`` has been measured (reading it costs nothing)."""
        return self._key(per_forward_part(part)) in self.measured

    def typical_measure(self) -> float:
        """Seconds a new measure is expected to take (warm-up and timed steps): the median of
        the measures so far (0 before any). Not the longest: one slow part (FP4, simulated on
        Hopper, took 42 s against a typical 14 s on the H200, issue 22) would reserve its time
        for every later part and stop the search; a measure that runs long is stopped at its
        ``deadline`` instead (``per_step_seconds``)."""
        measures = [p.warm_up_seconds + p.per_step_seconds * SPEED_STEPS for p in self.rows()]
        return statistics.median(measures) if measures else 0.0

    @staticmethod
    def _key(part: Recipe) -> str:
        return str(part) if part else ""

    def relative_time(self, recipe: Recipe, computed_share: float | None, deadline: float | None = None) -> float:
        """``recipe``'s modelled time relative to the unaccelerated model's, at the real size
        (``deadline``: as ``per_step_seconds``'s, for a part not measured yet)."""
        share = 1.0 if computed_share is None else computed_share
        return self.per_step_seconds(recipe, deadline) * share / self.per_step_seconds(Recipe())

    def _measure(self, part: Recipe, key: str) -> PartTime:
        def generate():
            return self.pipe(steps=SPEED_STEPS, **self.call)

        try:
            acceleration = accelerate(self.pipe, part) if part else None
        except ValueError as error:
            store = getattr(error, "missing_calibration", None)
            if store is None:
                raise
            raise ValueError(
                f"{key} needs its {store} calibration, which is made for the tuned model only, and has "
                f"no calibration-free form to time at {self.spec.name} (calibration-free forms: "
                + ", ".join(f"{name}={value!r}" for name, value in CALIBRATION_FREE.items())
                + ")"
            ) from None
        try:
            _, warm_up, _ = timed(generate, self.device)  # compilation and autotuning are paid here
            _, seconds, _ = timed(generate, self.device)
        finally:
            if acceleration is not None:
                acceleration.remove()
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()  # what the part allocated, before the tuned model runs again
        measured = PartTime(key, seconds / SPEED_STEPS, warm_up)
        self.progress(
            f"speed at {self.spec.name}: {key or 'baseline'}: {1000 * measured.per_step_seconds:.1f} ms per "
            f"step (warm-up {warm_up:.1f} s)"
        )
        return measured

    def rows(self) -> list[PartTime]:
        return list(self.measured.values())
