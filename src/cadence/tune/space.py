"""The search space: compositions of the registered techniques, one choice per level.

Nothing here lists recipes. Each level of the registry (``LEVELS``) is one categorical
choice among its techniques, or none; a chosen technique's cost knob is searched over the
range its ``param`` declares, every other parameter stays at its default:

- step: the policy and its ``budget`` (budget mode: every policy spends at most that share
  of the block work, so policies are compared at equal cost), ``cfg_reuse``, and MagCache's
  ``forecast`` (0 or 1, ``FORECASTS``);
- token: the attention pattern, its ``density`` and (on a GPU) its ``precision`` (bf16 or
  int8: the kept blocks on the sparse sage kernel; on the CPU that kernel is an emulation,
  slower than bf16, so precision is not searched there), or a dense backend's ``backend``;
- bit: the precision (each quantization technique at its defaults);
- graph: nothing searched. ``compile`` changes how fast a recipe runs, not what it computes
  (one bf16 rounding step at most), so the search would pay its warm-up (15-20 s a new
  candidate on the H200, inductor tracing the blocks with new hooks) for no information on
  quality: it is held back as a *late* technique, which the confirmation tries on the
  fastest candidates (``late``).

Peers (techniques registered from a ``peers`` module: diffusers' and torchao's own hooks,
kept for the bench's comparisons) are left out unless named in ``include``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cadence.accel.registry import LEVELS, TechniqueConfig, load_builtin
from cadence.recipe import Recipe

NONE = "none"
# The part of a cost knob's declared range that is searched: at 1 nothing is removed, and
# under 0.1 the always-computed warm-up steps and dense steps already exceed the budget.
KNOB_RANGE = {"budget": (0.1, 0.9), "density": (0.1, 0.9)}
KNOB_STEP = 0.05  # a grid, so that a resumed or repeated candidate is recognised as the same one
# MagCache's forecast orders searched: order 2 lost badly before its horizon limit, and is not
# measured with it (benchmarks/RESULTS.md, "Forecasting on MagCache's schedule").
FORECASTS = (0, 1)
# A sparse pattern's number formats searched on a GPU: fp8 Q·K measured slower than int8
# on Hopper (9.9 against 8.9 ms) and less exact (benchmarks/RESULTS.md, "Low-precision attention kernel").
PRECISIONS = ("bf16", "int8")
# SDPA backends that only exist on CUDA: on the CPU they fail or fall back to the default.
CUDA_ONLY_BACKENDS = ("cudnn", "flash", "efficient")
# Why compile is left out on the CPU unless asked for (--compile).
CPU_COMPILE_REASON = ("compile is left out on the CPU by default: inductor compiles each block class to C++ on the "
                      "first call, a warm-up paid again by every candidate that holds it; --compile adds it to the "
                      "fastest candidates at the confirmation")
# Techniques that do not change a recipe's output, only its speed: not searched, added to the
# fastest candidates at the confirmation (name -> the recipe term added).
LATE = {"compile": "compile"}
LATE_REASON = ("{names} not searched (no change to the output, a warm-up per candidate): the fastest candidates are "
               "confirmed with and without it")


def is_peer(config: type[TechniqueConfig]) -> bool:
    return config.__module__.rsplit(".", 1)[-1] == "peers"


def _check_names(names: tuple[str, ...], what: str, known: dict) -> None:
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"--{what} names unknown technique(s) {', '.join(map(repr, unknown))}; valid: "
                         f"{', '.join(sorted(known))}")


@dataclass(frozen=True)
class SearchSpace:
    """level -> the technique names the search chooses among (``none`` always included)."""

    choices: dict[str, tuple[str, ...]]
    device: str = "cpu"
    notes: tuple[str, ...] = field(default_factory=tuple)
    late: tuple[str, ...] = ()  # LATE's names this search adds at the confirmation

    @classmethod
    def from_registry(cls, include: tuple[str, ...] = (), exclude: tuple[str, ...] = (), device: str = "cpu",
                      compile: bool | None = None) -> SearchSpace:
        """Every registered technique, less the peers; ``include`` narrows to the named ones
        (peers may be named), ``exclude`` removes some. ``compile=None``: on CUDA only."""
        techniques = load_builtin()
        _check_names(include, "include", techniques)
        _check_names(exclude, "exclude", techniques)
        notes = []
        compile = device.startswith("cuda") if compile is None else compile
        if not compile and "compile" not in exclude:
            exclude = (*exclude, "compile")
            notes.append(CPU_COMPILE_REASON if not device.startswith("cuda") else "compile left out (--no-compile)")
        choices = {}
        for level in LEVELS:
            names = sorted(name for name, technique in techniques.items() if technique.config.level == level
                           and (name in include if include else not is_peer(technique.config))
                           and name not in exclude)
            choices[level] = (NONE, *names)
        late = tuple(name for names in choices.values() for name in names if name in LATE)
        choices = {level: tuple(name for name in names if name not in late) for level, names in choices.items()}
        if late:
            notes.append(LATE_REASON.format(names=", ".join(late)))
        if all(len(names) == 1 for names in choices.values()):
            raise ValueError("the search space is empty: --include/--exclude leave no technique to try"
                             + (f" ({', '.join(late)} alone is not searched: it is added to the fastest candidates)"
                                if late else ""))
        return cls(choices, device, tuple(notes), late)

    def late_recipe(self) -> Recipe:
        """The late techniques alone (empty when there are none)."""
        return Recipe.parse(" + ".join(LATE[name] for name in self.late)) if self.late else Recipe()

    def with_late(self, recipe: Recipe) -> Recipe | None:
        """``recipe`` with the late techniques it lacks added, or None when it has them all."""
        held = {t.name for t in recipe.techniques}
        missing = [t for t in self.late_recipe().techniques if t.name not in held]
        return Recipe([*recipe.techniques, *missing]) if missing and recipe else None

    def suggest(self, trial) -> Recipe:
        """One candidate from an Optuna trial (define-by-run: a knob exists only when its technique is chosen)."""
        techniques = load_builtin()
        configs = []
        for level in reversed(LEVELS):  # step first: the choice that moves speed and fidelity most
            name = trial.suggest_categorical(level, self.choices[level])
            if name == NONE:
                continue
            config = techniques[name].config
            configs.append(config.from_params(self._knobs(trial, config)))
        return Recipe(configs)

    def _knobs(self, trial, config: type[TechniqueConfig]) -> dict:
        fields = {f.name: f for f in config.fields()}
        params = {}
        for knob, (low, high) in KNOB_RANGE.items():
            if knob in fields:
                params[knob] = round(trial.suggest_float(knob, low, high, step=KNOB_STEP), 2)
        if "cfg_reuse" in fields and _accepts(config, {**params, "cfg_reuse": True}):
            params["cfg_reuse"] = trial.suggest_categorical("cfg_reuse", (False, True))
        if "forecast" in fields:
            params["forecast"] = trial.suggest_categorical("forecast", FORECASTS)
        if "precision" in fields and self.device.startswith("cuda") and _accepts(config, {"precision": "int8"}):
            params["precision"] = trial.suggest_categorical("precision", PRECISIONS)
        if config.level == "token" and "density" not in fields and fields.get("backend") is not None:
            backends = [b for b in fields["backend"].metadata["choices"]
                        if self.device.startswith("cuda") or b not in CUDA_ONLY_BACKENDS]
            params["backend"] = trial.suggest_categorical("backend", tuple(backends))
        return params

    def params_of(self, recipe: Recipe) -> dict:
        """The trial parameters that give ``recipe`` (to enqueue a known recipe, e.g. the shipped
        default); techniques or knobs outside this space are left out."""
        params = {level: NONE for level in LEVELS}
        for config in recipe.techniques:
            if config.name not in self.choices.get(config.level, ()):
                continue
            params[config.level] = config.name
            for knob in KNOB_RANGE:
                if hasattr(config, knob):
                    params[knob] = getattr(config, knob)
            if hasattr(config, "cfg_reuse"):
                params["cfg_reuse"] = config.cfg_reuse
            if getattr(config, "forecast", None) in FORECASTS:
                params["forecast"] = config.forecast
            if getattr(config, "precision", None) in PRECISIONS and self.device.startswith("cuda"):
                params["precision"] = config.precision
            if config.level == "token" and not hasattr(config, "density"):
                params["backend"] = config.backend
        return params

    def restrict(self, recipe: Recipe) -> Recipe:
        """``recipe`` without the techniques this space leaves out (the shipped default as this
        search could have found it, e.g. without compile on the CPU)."""
        return Recipe(t for t in recipe.techniques if t.name in self.choices.get(t.level, ()) or t.name in self.late)

    def describe(self) -> str:
        lines = [f"- {level}: {', '.join(names)}" for level, names in self.choices.items()]
        if self.late:
            lines.append(f"- added at the confirmation: {', '.join(self.late)}")
        knobs = ", ".join(f"{knob} in [{low}, {high}] by {KNOB_STEP}" for knob, (low, high) in KNOB_RANGE.items())
        knobs += "; cfg_reuse true/false; MagCache's forecast 0/1; a dense backend's backend"
        if self.device.startswith("cuda"):
            knobs += f"; a sparse pattern's precision {'/'.join(PRECISIONS)}"
        return "\n".join([*lines, f"- knobs: {knobs}"])


def features(recipe: Recipe) -> dict[str, float]:
    """What the cost model reads off a candidate: one indicator per technique (per backend
    for a dense one), the log of its budget and density (0 when nothing is removed), cfg_reuse."""
    found: dict[str, float] = {}
    for config in recipe.techniques:
        backend = getattr(config, "backend", None) if config.level == "token" and not hasattr(config, "density") else None
        found[f"{config.name}:{backend}" if backend else config.name] = 1.0
        for knob in KNOB_RANGE:
            value = getattr(config, knob, 0) or 0
            if value:
                found[f"log_{knob}"] = math.log(value)
        if getattr(config, "cfg_reuse", False):
            found["cfg_reuse"] = 1.0
        if getattr(config, "forecast", 0):
            found["forecast"] = 1.0
        if getattr(config, "precision", "bf16") != "bf16":
            found[f"precision:{config.precision}"] = 1.0
    return found


def _accepts(config: type[TechniqueConfig], params: dict) -> bool:
    """Whether the technique takes these knobs (block-delta has cfg_reuse but refuses true):
    a knob it always refuses is not searched, so no trial is spent on the refusal."""
    try:
        config.from_params(params)
    except ValueError:
        return False
    return True
