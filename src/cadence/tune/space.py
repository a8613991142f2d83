"""The search space: compositions of the registered techniques, one choice per level.

Nothing here lists recipes. Each level of the registry (``LEVELS``) is one categorical
choice among its techniques, or none; a chosen technique's cost knob is searched over the
range its ``param`` declares, every other parameter stays at its default:

- step: the policy and its ``budget`` (budget mode: every policy spends at most that share
  of the block work, so policies are compared at equal cost), ``cfg_reuse``, and MagCache's
  ``forecast`` (0 or 1, ``FORECASTS``);
- token: the attention pattern, its ``density`` and (on a GPU) its ``precision`` (bf16,
  int8 or fp8: the kept blocks on the sparse sage kernel; on the CPU that kernel is an emulation,
  slower than bf16, so precision is not searched there), or a dense backend's ``backend``
  among those the model runs (``unusable_backends``: probed on the model before the study).
  On a CUDA device SDPA's ``math`` backend is left out (``REFERENCE_BACKENDS``): the reference
  kernel, never faster there than the fused ones; ``include`` names techniques, not backends,
  so nothing brings it back into a search (a recipe naming it still runs it);
- bit: the precision (each quantization technique at its defaults). On a CUDA device without
  FP4 tensor cores (compute capability below ``FP4_CAPABILITY``) the FP4 formats are left out
  unless named in ``include`` (``fp4_left_out``): cadence simulates them there, several times
  a bf16 step's cost, so they cannot win on speed, and with ``--speed-at`` (timed on the same
  device) their measure was the longest of issue 22's run. On the CPU, where no format has a
  tensor-core path and the 8-bit ones are emulated too, they stay. With ``--speed-at`` a
  technique that cannot be timed at the real size is left out unless named in ``include``
  (``realsize.timable``: ``mixed``, whose sensitivity calibration is made for the tuned model
  only and which has no calibration-free form; each of its candidates failed in issue 22);
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
import warnings
from dataclasses import dataclass, field

import torch

from cadence.accel.attention import kernels
from cadence.accel.quant.formats import FORMATS
from cadence.accel.quant.formats.fp4 import FP4Format
from cadence.accel.registry import LEVELS, TechniqueConfig, load_builtin
from cadence.recipe import Recipe
from cadence.tune import realsize
from cadence.tune.evaluate import FAILURES

NONE = "none"
# The part of a cost knob's declared range that is searched: at 1 nothing is removed, and
# under 0.1 the always-computed warm-up steps and dense steps already exceed the budget.
KNOB_RANGE = {"budget": (0.1, 0.9), "density": (0.1, 0.9)}
KNOB_STEP = 0.05  # a grid, so that a resumed or repeated candidate is recognised as the same one
# MagCache's forecast orders searched: order 2 lost badly before its horizon limit, and is not
# measured with it (benchmarks/RESULTS.md, "Forecasting on MagCache's schedule").
FORECASTS = (0, 1)
# A sparse pattern's number formats searched on a GPU. On the block-sparse sage kernel FP8 Q·K
# ran 6-9 % faster than INT8 at every density on the H200 (2.69 against 2.91 ms at 0.25), the
# reverse of the dense kernels, with the same error against the reference (0.025 relative L2):
# benchmarks/RESULTS.md, "Speed on the H200: the two savings multiply".
PRECISIONS = ("bf16", "int8", "fp8")
# SDPA backends that only exist on CUDA: on the CPU they fail or fall back to the default.
CUDA_ONLY_BACKENDS = ("cudnn", "flash", "efficient")
# SDPA's reference kernel: it materialises every query-key score, so on CUDA it is never faster
# than the fused kernels; at wan2.1-1.3b on the H200 its part was 14x the baseline's step and
# its measure took a third of a 9-minute run (issue 22). Left out on CUDA, kept on the CPU.
REFERENCE_BACKENDS = ("math",)
REFERENCE_REASON = ("SDPA's reference kernel, which materialises every query-key score: on CUDA never faster than "
                    "the fused kernels; --include names techniques, not backends, so no option searches it (a recipe "
                    "naming it still runs it)")
# The probe's query length: one 128-token tile, the block the sage kernels' tiles are cut from.
PROBE_TOKENS = 128
# A head size for the probe when the model's attention modules do not say theirs (diffusers'
# Attention: ``heads`` and ``to_q``); 128 is the video families' (Wan, HunyuanVideo).
PROBE_HEAD_DIM = 128
# Why compile is left out on the CPU unless asked for (--compile).
CPU_COMPILE_REASON = ("compile is left out on the CPU by default: inductor compiles each block class to C++ on the "
                      "first call, a warm-up paid again by every candidate that holds it; --compile adds it to the "
                      "fastest candidates at the confirmation")
# Techniques that do not change a recipe's output, only its speed: not searched, added to the
# fastest candidates at the confirmation (name -> the recipe term added).
LATE = {"compile": "compile"}
LATE_REASON = ("{names} not searched (no change to the output, a warm-up per candidate): the fastest candidates are "
               "confirmed with and without it")


# Blackwell's compute capability: the first with FP4 (E2M1) tensor cores. Below it cadence's
# nvfp4 and mxfp4 run simulated (accel/quant/fp4.py).
FP4_CAPABILITY = (10, 0)
# Ada's and Hopper's: the first with FP8 (E4M3) tensor cores. Below it (Turing, Ampere) the
# native low-precision GEMM is INT8's.
FP8_CAPABILITY = (8, 9)


# Levels whose techniques act only while streaming (cadence.stream): not in a one-shot search.
STREAM_ONLY_LEVELS = ("sequence",)


def is_peer(config: type[TechniqueConfig]) -> bool:
    return config.__module__.rsplit(".", 1)[-1] == "peers"


def is_dense_backend(config: type[TechniqueConfig]) -> bool:
    """A token technique that chooses a dense kernel (``backend``) rather than a sparse pattern."""
    fields = {f.name for f in config.fields()}
    return config.level == "token" and "density" not in fields and "backend" in fields


def unusable_backends(model: torch.nn.Module, backends: tuple[str, ...]) -> dict[str, str]:
    """The dense attention backends of ``backends`` that fail on ``model``'s attention -> their error.

    Why: SDPA's flash and cuDNN kernels take only fp16 / bf16, so on a float32 model (ref-video
    on an H200) every candidate holding them failed at once with "No available kernel", and
    TPE, which ignores failed trials, kept proposing them: 909 of 1012 trials of a 9-minute
    run failed. One call of each backend on small random tensors of the model's dtype, device
    and head size finds this before the study (FlexAttention on a GPU pays one compilation at
    the probe's shape). Only what the evaluator counts as a candidate's failure (``FAILURES``)
    leaves a backend out; anything else stops the run, as it would in a trial."""
    parameter = next(model.parameters())
    attention = next((m for m in model.modules() if hasattr(m, "heads") and hasattr(m, "to_q")), None)
    head_dim = attention.to_q.out_features // attention.heads if attention is not None else PROBE_HEAD_DIM
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 2, PROBE_TOKENS, head_dim, generator=generator)
                         .to(parameter.device, parameter.dtype) for _ in range(3))
    failing = {}
    for backend in backends:
        try:
            with warnings.catch_warnings():  # SDPA warns once per kernel it skips: the error says enough
                warnings.simplefilter("ignore")
                kernels.dense(query, key, value, backend=backend)
        except FAILURES as error:
            message = str(error).strip().splitlines()
            failing[backend] = f"{type(error).__name__}: {message[0] if message else ''}"
    return failing


def is_fp4(config: type[TechniqueConfig]) -> bool:
    """A technique whose layers take an FP4 format (its ``mode``, in the format registry)."""
    mode = getattr(config, "mode", None)
    return mode in FORMATS and isinstance(FORMATS[mode], FP4Format)


def fp4_left_out(device: str) -> str | None:
    """Why the FP4 techniques are left out on ``device`` (None where they stay: the CPU, a CUDA
    device with FP4 tensor cores, or one this process cannot query)."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) >= FP4_CAPABILITY:
        return None
    return (f"{torch.cuda.get_device_name(device)} (compute capability {capability[0]}.{capability[1]}) has no FP4 "
            f"tensor cores (from {FP4_CAPABILITY[0]}.{FP4_CAPABILITY[1]}, Blackwell): FP4 runs simulated there, "
            "slower than bf16; --include names them to search them all the same")


def native_linear_format(device: str) -> str | None:
    """The bit-level technique whose linears run on ``device``'s own low-precision tensor cores:
    ``fp8`` from compute capability ``FP8_CAPABILITY``, ``int8`` below it; None on the CPU (every
    format is emulated there) or a CUDA device this process cannot query."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    return "fp8" if tuple(torch.cuda.get_device_capability(device)) >= FP8_CAPABILITY else "int8"


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
    backends: tuple[str, ...] = tuple(kernels.DENSE_BACKENDS)  # the dense backends a dense technique may take

    @classmethod
    def from_registry(cls, include: tuple[str, ...] = (), exclude: tuple[str, ...] = (), device: str = "cpu",
                      compile: bool | None = None, model: torch.nn.Module | None = None,
                      speed_at: str | None = None) -> SearchSpace:
        """Every registered technique, less the peers; ``include`` narrows to the named ones
        (peers may be named), ``exclude`` removes some. ``compile=None``: on CUDA only.
        ``model``: the dense backends that fail on it are left out (``unusable_backends``), and
        a dense technique left with none is left out. ``speed_at`` (a real size candidates are
        timed at): the techniques that cannot be timed there are left out unless included."""
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
            if level in STREAM_ONLY_LEVELS:  # a one-shot generation has no KV cache to search over
                choices[level] = (NONE,)
                continue
            names = sorted(name for name, technique in techniques.items() if technique.config.level == level
                           and (name in include if include else not is_peer(technique.config))
                           and name not in exclude)
            choices[level] = (NONE, *names)
        fp4_reason = fp4_left_out(device)
        fp4 = [name for name in choices["bit"] if name != NONE and is_fp4(techniques[name].config)
               and name not in include]
        if fp4_reason and fp4:
            choices["bit"] = tuple(name for name in choices["bit"] if name not in fp4)
            notes.append(f"{', '.join(fp4)} left out: {fp4_reason}")
        if speed_at is not None:
            realsize.spec(speed_at)  # refused naming the known real sizes
            untimable = [name for level, names in choices.items() for name in names if name != NONE
                         and not realsize.timable(techniques[name]) and name not in include]
            choices = {level: tuple(n for n in names if n not in untimable) for level, names in choices.items()}
            notes += [f"{name} left out: candidates are timed at {speed_at}, where its "
                      f"{techniques[name].calibration.store} calibration, made for the tuned model only, cannot be "
                      "read and it has no calibration-free form; --include names it to search it all the same"
                      for name in untimable]
        cuda = device.startswith("cuda")
        backends = tuple(b for b in kernels.DENSE_BACKENDS
                         if b not in (REFERENCE_BACKENDS if cuda else CUDA_ONLY_BACKENDS))
        dense = [name for name in choices["token"] if name != NONE and is_dense_backend(techniques[name].config)]
        if cuda:
            notes += [f"{name} backend {backend!r} left out: {REFERENCE_REASON}" for name in dense
                      for backend in REFERENCE_BACKENDS if backend in _backend_choices(techniques[name].config)]
        if model is not None and dense:
            # A resumed study builds the same space: the probe gives the same answer on the same machine.
            failing = unusable_backends(model, backends)
            backends = tuple(b for b in backends if b not in failing)
            dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
            notes += [f"{name} backend {backend!r} left out: it fails on this model's {dtype} attention: {error}"
                      for name in dense for backend, error in failing.items()]
            for name in dense:
                if not set(backends) & set(_backend_choices(techniques[name].config)):
                    choices["token"] = tuple(n for n in choices["token"] if n != name)
                    notes.append(f"{name} left out: none of its backends runs on this model")
        late = tuple(name for names in choices.values() for name in names if name in LATE)
        choices = {level: tuple(name for name in names if name not in late) for level, names in choices.items()}
        if late:
            notes.append(LATE_REASON.format(names=", ".join(late)))
        if all(len(names) == 1 for names in choices.values()):
            raise ValueError("the search space is empty: --include/--exclude leave no technique to try"
                             + (f" ({', '.join(late)} alone is not searched: it is added to the fastest candidates)"
                                if late else ""))
        return cls(choices, device, tuple(notes), late, backends)

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
        if is_dense_backend(config):
            backends = tuple(b for b in _backend_choices(config) if b in self.backends)
            params["backend"] = trial.suggest_categorical("backend", backends)
        return params

    def params_of(self, recipe: Recipe) -> dict:
        """The trial parameters that give ``recipe`` (to enqueue a known recipe, e.g. the shipped
        default); techniques or knobs outside this space are left out."""
        params = {level: NONE for level in LEVELS}
        for config in recipe.techniques:
            if not self._holds(config):
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
            if is_dense_backend(type(config)):
                params["backend"] = config.backend
        return params

    def restrict(self, recipe: Recipe) -> Recipe:
        """``recipe`` without the techniques this space leaves out (the shipped default as this
        search could have found it, e.g. without compile on the CPU)."""
        return Recipe(t for t in recipe.techniques if self._holds(t) or t.name in self.late)

    def _holds(self, config: TechniqueConfig) -> bool:
        """Whether this space can propose ``config``: its technique is searched, and a dense
        technique's backend (its default when the recipe names none) is one the model runs."""
        if config.name not in self.choices.get(config.level, ()):
            return False
        return not is_dense_backend(type(config)) or config.backend in self.backends

    def describe(self) -> str:
        lines = [f"- {level}: {', '.join(names)}" for level, names in self.choices.items()]
        if self.late:
            lines.append(f"- added at the confirmation: {', '.join(self.late)}")
        knobs = ", ".join(f"{knob} in [{low}, {high}] by {KNOB_STEP}" for knob, (low, high) in KNOB_RANGE.items())
        knobs += f"; cfg_reuse true/false; MagCache's forecast 0/1; a dense backend's backend {'/'.join(self.backends)}"
        cuda = self.device.startswith("cuda")
        left_out = [b for b in kernels.DENSE_BACKENDS if b not in self.backends
                    and b not in (REFERENCE_BACKENDS if cuda else CUDA_ONLY_BACKENDS)]
        why = [f"{'/'.join(left_out)} left out: they fail on this model"] if left_out else []
        if cuda:
            why.append(f"{'/'.join(REFERENCE_BACKENDS)} left out on CUDA: SDPA's reference kernel")
        if why:
            knobs += f" ({'; '.join(why)}; see the notes)"
        if self.device.startswith("cuda"):
            knobs += f"; a sparse pattern's precision {'/'.join(PRECISIONS)}"
        return "\n".join([*lines, f"- knobs: {knobs}"])


def features(recipe: Recipe) -> dict[str, float]:
    """What the cost model reads off a candidate: one indicator per technique (per backend
    for a dense one), the log of its budget and density (0 when nothing is removed), cfg_reuse."""
    found: dict[str, float] = {}
    for config in recipe.techniques:
        backend = config.backend if is_dense_backend(type(config)) else None
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


def _backend_choices(config: type[TechniqueConfig]) -> tuple[str, ...]:
    return next(f for f in config.fields() if f.name == "backend").metadata["choices"]


def _accepts(config: type[TechniqueConfig], params: dict) -> bool:
    """Whether the technique takes these knobs (block-delta has cfg_reuse but refuses true):
    a knob it always refuses is not searched, so no trial is spent on the refusal."""
    try:
        config.from_params(params)
    except ValueError:
        return False
    return True
