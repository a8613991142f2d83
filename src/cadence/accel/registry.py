"""The technique registry: name -> (config class, apply function), and the handle that
every ``apply`` returns."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

# Built-in techniques register themselves when their module is imported: every public
# module under cadence.accel (one folder per level) is imported once.
BUILTIN_PACKAGE = "cadence.accel"


class TechniqueConfig:
    """Base of every technique config: a frozen dataclass whose fields are the
    technique's parameters. Subclasses set ``name``, ``level`` and ``summary`` and
    validate their values in ``__post_init__``."""

    name: ClassVar[str]
    level: ClassVar[str]  # step | block | token | bit | graph | stage | sequence
    summary: ClassVar[str]
    # False for techniques whose hooks sit on modules inside the blocks and keep Python state
    # per call (diffusers' PAB, FasterCache, TaylorSeer): a compiled block would trace them.
    compile_safe: ClassVar[bool] = True

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
        """(parameter, type, default, help) for every parameter."""
        hints = typing.get_type_hints(cls)
        return [
            (f.name, getattr(hints[f.name], "__name__", str(hints[f.name])), f.default, f.metadata.get("help", ""))
            for f in cls.fields()
        ]

    def __str__(self) -> str:
        defaults = {f.name: f.default for f in self.fields()}
        changed = [f"{k}={_format(v)}" for k, v in self.params().items() if v != defaults[k]]
        return f"{self.name}({', '.join(changed)})" if changed else self.name


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
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value)
    return repr(value)


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
class Technique:
    config: type[TechniqueConfig]
    apply: Callable[[torch.nn.Module, TechniqueConfig], Handle]


TECHNIQUES: dict[str, Technique] = {}


def register(config: type[TechniqueConfig], apply: Callable[[torch.nn.Module, Any], Handle]) -> None:
    if config.name in TECHNIQUES and TECHNIQUES[config.name].config is not config:
        raise ValueError(f"technique name {config.name!r} is already registered")
    TECHNIQUES[config.name] = Technique(config, apply)


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
