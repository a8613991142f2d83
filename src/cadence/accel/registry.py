"""The technique registry: everything a technique has, declared once where it registers.

A technique is a frozen config dataclass (its parameters, validated on construction), an
``apply(model, config) -> Handle`` and, where it must measure the model first, a
:class:`Calibration`. ``register`` records all of it; the CLI, the recipe parser and the
tests read the registry and never probe modules.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import pkgutil
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

# Built-in techniques register themselves when their module is imported: every public
# module under cadence.accel (one folder per level) is imported once.
BUILTIN_PACKAGE = "cadence.accel"

# The levels of the generation loop a technique works at, in the order ``accelerate``
# applies them (recipe.APPLY_ORDER): a recipe holds at most one technique per level.
LEVELS = ("graph", "bit", "token", "step", "sequence")


def param(default: Any, help: str, *, choices: tuple | None = None, low: float | None = None,
          high: float | None = None, low_open: bool = False, high_open: bool = False, why: str = "") -> Any:
    """A config field with its help text and the values it takes: one of ``choices``, or a
    number between ``low`` and ``high`` (closed bounds unless ``*_open``; NaN and infinity
    are refused). Every config checks these on construction (``TechniqueConfig.__post_init__``);
    ``why`` ends the refusal's message where the bound is not obvious."""
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": choices, "low": low, "high": high, "low_open": low_open, "high_open": high_open,
        "why": why})


class TechniqueConfig:
    """Base of every technique config: a frozen dataclass whose fields are the
    technique's parameters. Subclasses set ``name``, ``level`` and ``summary``.

    Validation is one mechanism for every config: on construction each field is checked
    against what its ``param`` declares (choices, range), then every class of the config's
    hierarchy that defines ``validate`` runs it, base classes first, on the rules one field
    cannot state (a special value, two fields together). A ``validate`` checks only what its
    own class adds (it never calls ``super().validate()``) and refuses through ``require``,
    so every message starts with the technique's name."""

    name: ClassVar[str]
    level: ClassVar[str]  # one of LEVELS
    summary: ClassVar[str]
    # False for techniques whose hooks sit on modules inside the blocks and keep Python state
    # per call (diffusers' PAB, FasterCache, TaylorSeer): a compiled block would trace them.
    compile_safe: ClassVar[bool] = True

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_field(self.name, f, getattr(self, f.name))
        for klass in reversed(type(self).__mro__):
            validate = klass.__dict__.get("validate")
            if validate is not None:
                validate(self)

    def require(self, ok: bool, message: str) -> None:
        """Refuse this configuration unless ``ok``; ``message`` names the bad value and the valid ones."""
        if not ok:
            raise ValueError(f"{self.name}: {message}")

    @classmethod
    def fields(cls) -> list[dataclasses.Field]:
        """The parameters, the technique's own before those its base class shares."""
        own = cls.__dict__.get("__annotations__", {})
        fields = dataclasses.fields(cls)
        return [f for f in fields if f.name in own] + [f for f in fields if f.name not in own]

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in self.fields()}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "TechniqueConfig":
        fields = {f.name: f for f in cls.fields()}
        unknown = sorted(set(params) - set(fields))
        if unknown:
            raise ValueError(
                f"unknown parameter {', '.join(map(repr, unknown))} for technique "
                f"{cls.name!r}; valid: {', '.join(fields) or '(none)'}"
            )
        hints = typing.get_type_hints(cls)
        return cls(**{key: _coerce(cls.name, key, value, hints[key]) for key, value in params.items()})

    @classmethod
    def describe(cls) -> list[tuple[str, str, Any, str]]:
        """(parameter, type, default, help) for every parameter; the help ends with the
        values the parameter takes."""
        hints = typing.get_type_hints(cls)
        return [
            (f.name, getattr(hints[f.name], "__name__", str(hints[f.name])), f.default, _help(f))
            for f in cls.fields()
        ]

    def __str__(self) -> str:
        defaults = {f.name: f.default for f in self.fields()}
        changed = [f"{k}={_format(v)}" for k, v in self.params().items() if v != defaults[k]]
        return f"{self.name}({', '.join(changed)})" if changed else self.name

    def spelled_out(self) -> str:
        """Every parameter, defaults included (``str`` leaves defaults out): what defines it, for a report."""
        return f"{self.name}({', '.join(f'{k}={_format(v)}' for k, v in self.params().items())})"


def _valid_values(meta) -> str:
    """What a field's ``param`` declares it takes, in words ('' when anything goes)."""
    if meta.get("choices") is not None:
        return f"one of {', '.join(map(str, meta['choices']))}"
    low, high = meta.get("low"), meta.get("high")
    if low is not None and high is not None:
        return f"in {'(' if meta['low_open'] else '['}{low}, {high}{')' if meta['high_open'] else ']'}"
    if low is not None:
        return f"{'>' if meta['low_open'] else '>='} {low}"
    if high is not None:
        return f"{'<' if meta['high_open'] else '<='} {high}"
    return ""


def _help(f: dataclasses.Field) -> str:
    valid = _valid_values(f.metadata)
    return f"{f.metadata.get('help', '')} ({valid})" if valid else f.metadata.get("help", "")


def _check_field(technique: str, f: dataclasses.Field, value: Any) -> None:
    meta = f.metadata
    choices = meta.get("choices")
    why = f": {meta['why']}" if meta.get("why") else ""
    if choices is not None:
        if value not in choices:
            raise ValueError(f"{technique}: {f.name}={value!r}; valid: {', '.join(map(str, choices))}{why}")
        return
    low, high = meta.get("low"), meta.get("high")
    if low is None and high is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{technique}: {f.name}={value!r} must be a number {_valid_values(meta)}")
    above = low is None or (value > low if meta["low_open"] else value >= low)
    below = high is None or (value < high if meta["high_open"] else value <= high)
    if not (above and below and math.isfinite(value)):  # NaN fails every comparison
        raise ValueError(f"{technique}: {f.name}={value!r} must be {_valid_values(meta)}{why}")


def _coerce(technique: str, key: str, value: Any, kind: Any) -> Any:
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false"):
                    raise ValueError
                return value.lower() == "true"
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is str:
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"parameter {key}={value!r} of technique {technique!r} must be of type {kind.__name__}"
        ) from None
    return value


def _format(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value)


class Handle:
    """What ``apply`` returns: ``remove()`` restores the model exactly; ``stats()``
    reports what the technique did (e.g. the fraction of transformer work computed)."""

    def __init__(self, config: TechniqueConfig, remove: Callable[[], None], stats: Callable[[], dict] | None = None):
        self.config = config
        self._remove = remove
        self._stats = stats or dict
        self.removed = False

    def remove(self) -> None:
        if not self.removed:
            self._remove()
            self.removed = True

    def stats(self) -> dict:
        return self._stats()

    def __repr__(self) -> str:
        return f"Handle({self.config}, removed={self.removed})"


@dataclass(frozen=True)
class Calibration:
    """How a technique measures a model before it can run (``cadence calibrate``).

    ``run(pipe, runs, path=None, progress=None) -> Path`` generates ``pipe(**run)`` for each
    run with every step computed and saves what it fits in the calibration store
    (:mod:`cadence.accel.calibration`) under ``store``, the name of what it holds
    (``teacache``, ``activations``, ...; techniques that read the same measurement share
    it); ``describe(data) -> str`` says what a saved one holds."""

    store: str
    run: Callable[..., Any]
    describe: Callable[[dict], str]


@dataclass(frozen=True)
class Technique:
    config: type[TechniqueConfig]
    apply: Callable[[torch.nn.Module, TechniqueConfig], Handle]
    calibration: Calibration | None = None


TECHNIQUES: dict[str, Technique] = {}


def register(config: type[TechniqueConfig], apply: Callable[[torch.nn.Module, Any], Handle],
             calibration: Calibration | None = None) -> None:
    """Make a technique known by its config's ``name``: recipes, the CLI and the tests find
    it here, with its calibration if it needs one."""
    if config.level not in LEVELS:
        raise ValueError(f"technique {config.name!r}: level={config.level!r}; valid: {', '.join(LEVELS)}")
    if config.name in TECHNIQUES and TECHNIQUES[config.name].config is not config:
        raise ValueError(f"technique name {config.name!r} is already registered")
    TECHNIQUES[config.name] = Technique(config, apply, calibration)


def unregister(name: str) -> None:
    """Forget a technique (one registered by a plug-in or a test)."""
    TECHNIQUES.pop(name, None)


@functools.cache
def _import_builtin() -> None:
    package = importlib.import_module(BUILTIN_PACKAGE)
    for module in pkgutil.walk_packages(package.__path__, BUILTIN_PACKAGE + "."):
        if not module.name.rsplit(".", 1)[-1].startswith("_"):
            importlib.import_module(module.name)


def load_builtin() -> dict[str, Technique]:
    _import_builtin()
    return TECHNIQUES


def get_technique(name: str) -> Technique:
    techniques = load_builtin()
    if name not in techniques:
        raise ValueError(f"unknown technique {name!r}; valid: {', '.join(sorted(techniques))}")
    return techniques[name]


def calibrations() -> dict[str, Calibration]:
    """Every name ``cadence calibrate --technique`` takes: the techniques that need a
    calibration, and the stored measurements by their own name (``activations``, which the
    FP8, INT8 and FP4 techniques share)."""
    found: dict[str, Calibration] = {}
    for name, technique in sorted(load_builtin().items()):
        if technique.calibration is not None:
            found[name] = technique.calibration
            found.setdefault(technique.calibration.store, technique.calibration)
    return found
