"""Recipe: an ordered, serialisable list of technique configs, and ``accelerate``.

A recipe is written three equivalent ways that round-trip:

- Python: ``Recipe([FixedIntervalConfig(interval=3)])``
- one CLI string: ``"fixed-interval(interval=3, warmup=2)"``; techniques joined by ``+``;
  ``baseline`` (or ``none``) is the empty recipe. An empty string is refused: it is more often
  a variable left unset than a wish for the baseline.
- TOML: a file of ``[[technique]]`` tables, each with ``name`` and its parameters

A model holds one technique per level, whether they come in one recipe or through several
``accelerate`` calls: a second call that adds a technique at a level an earlier, still active
call holds is refused, as the recipe would be.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from cadence.accel.registry import LEVELS, Handle, TechniqueConfig, get_technique, load_builtin
from cadence.context import get_context
from cadence.models import find_transformer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BASELINE = "baseline"
_TERM = re.compile(r"^\s*([A-Za-z][\w-]*)\s*(?:\((.*)\))?\s*$", re.S)


@dataclass(frozen=True)
class Recipe:
    techniques: tuple[TechniqueConfig, ...] = field(default_factory=tuple)

    def __init__(self, techniques: Iterable[TechniqueConfig] = ()):
        techniques = tuple(techniques)
        for technique in techniques:
            if not isinstance(technique, TechniqueConfig):
                raise TypeError(f"a recipe holds technique configs, got {type(technique).__name__}: {technique!r}")
        object.__setattr__(self, "techniques", techniques)
        _check_compatible(techniques)

    def __str__(self) -> str:
        return " + ".join(map(str, self.techniques)) or BASELINE

    def __bool__(self) -> bool:
        return bool(self.techniques)

    # -- the three forms -------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> "Recipe":
        """A CLI string, or the path of a TOML file."""
        if text.strip().endswith(".toml"):
            path = Path(text.strip())
            if not path.is_file():
                raise ValueError(f"recipe file {str(path)!r} does not exist")
            return cls.from_toml(path.read_text())
        if not text.strip():
            raise ValueError(f"recipe {text!r} is empty; write '{BASELINE}' for the unaccelerated model, or a "
                             "technique such as 'fixed-interval(interval=2)' (`cadence recipes` lists them)")
        if text.strip() in (BASELINE, "none"):
            return cls()
        _check_brackets(text)
        return cls(_parse_term(term) for term in _split_top_level(text, "+"))

    def spelled_out(self) -> str:
        """Every parameter of every technique, defaults included: what defines the recipe,
        for a report (``str`` leaves defaults out)."""
        return " + ".join(t.spelled_out() for t in self.techniques) or BASELINE

    def to_toml(self) -> str:
        return tomli_w.dumps({"technique": [{"name": t.name, **t.params()} for t in self.techniques]})

    @classmethod
    def from_toml(cls, text: str) -> "Recipe":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"recipe TOML does not parse: {error}") from None
        unknown = sorted(set(data) - {"technique"})
        if unknown:
            raise ValueError(f"unknown recipe TOML key(s) {unknown}; a recipe is a list of [[technique]] tables")
        tables = data.get("technique", [])
        if not isinstance(tables, list) or not all(isinstance(table, dict) for table in tables):
            raise ValueError(
                f"recipe TOML 'technique' must be a list of [[technique]] tables, got {tables!r}; e.g.\n"
                '[[technique]]\nname = "fixed-interval"\ninterval = 3'
            )
        configs = []
        for table in tables:
            table = dict(table)
            if "name" not in table:
                raise ValueError(f"a [[technique]] table needs a name: {table}")
            configs.append(get_technique(table.pop("name")).config.from_params(table))
        return cls(configs)


_FORM = "expected name or name(key=value, ...), techniques joined by +"


def _check_brackets(text: str) -> None:
    """A stray ')' would otherwise reach a value ('2)' is not an int) and be reported as one."""
    depth, quote = 0, ""
    for position, char in enumerate(text, 1):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise ValueError(f"cannot parse recipe {text.strip()!r}: stray ')' at character {position}; {_FORM}")
    if quote:
        raise ValueError(f"cannot parse recipe {text.strip()!r}: the quote {quote} is never closed; {_FORM}")
    if depth:
        raise ValueError(f"cannot parse recipe {text.strip()!r}: '(' is never closed; {_FORM}")


def _split_top_level(text: str, separator: str) -> list[str]:
    parts, depth, current, quote = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        else:
            depth += char == "("
            depth -= char == ")"
        if char == separator and depth == 0 and not quote:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]


def _parse_term(term: str) -> TechniqueConfig:
    match = _TERM.match(term)
    if not match:
        raise ValueError(f"cannot parse recipe term {term.strip()!r}; expected name or name(key=value, ...)")
    name, arguments = match.group(1), match.group(2) or ""
    params: dict[str, Any] = {}
    for argument in filter(str.strip, _split_top_level(arguments, ",")):
        key, equals, value = argument.partition("=")
        if not equals:
            raise ValueError(f"recipe argument {argument.strip()!r} of {name!r} must be key=value")
        params[key.strip()] = _parse_value(value.strip())
    return get_technique(name).config.from_params(params)


def _parse_value(value: str) -> Any:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


# level -> what a recipe may hold one of: each level's techniques own the same part of
# the model (the forward's schedule, the attention calls, the linears, the block graphs).
ONE_PER_LEVEL = {"step": "step-reuse policy", "token": "attention technique", "bit": "quantization technique",
                 "graph": "compilation"}
HINTS = {
    "bit": "; for a precision per layer use mixed",
    "token": "; a sparse pattern runs its own kernel: sparse and low-precision attention do not combine",
}
# Whatever order a recipe is written in, its techniques are applied in the order of the
# registry's LEVELS: compile first, so that its hook is the innermost forward of every block
# and the hooks of the others stay outside the graph; then the module swaps (quantization),
# then hooks.
APPLY_ORDER = LEVELS


def _check_compatible(techniques: tuple[TechniqueConfig, ...]) -> None:
    for level, what in ONE_PER_LEVEL.items():
        names = [t.name for t in techniques if t.level == level]
        if len(names) > 1:
            raise ValueError(f"a recipe can hold one {what}, got {len(names)}: {', '.join(names)}{HINTS.get(level, '')}")
    if any(t.level == "graph" for t in techniques):
        traced = [t.name for t in techniques if not t.compile_safe]
        if traced:
            raise ValueError(
                f"compile cannot hold {', '.join(traced)}: its hooks sit on modules inside the blocks, where the "
                "compiled graph would trace their per-step state; use it without compile, or a cadence policy"
            )


def apply_order(recipe: "Recipe") -> list[TechniqueConfig]:
    """The recipe's techniques in the order ``accelerate`` applies them."""
    rank = {level: index for index, level in enumerate(APPLY_ORDER)}
    return sorted(recipe.techniques, key=lambda t: rank.get(t.level, len(rank)))


def as_recipe(recipe: "Recipe | str | TechniqueConfig | Iterable[TechniqueConfig]") -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, str):
        return Recipe.parse(recipe)
    if isinstance(recipe, TechniqueConfig):
        return Recipe([recipe])
    if isinstance(recipe, Iterable):
        return Recipe(recipe)
    raise TypeError(
        f"a recipe is a Recipe, a recipe string such as 'fixed-interval(interval=2)', a technique config or a list "
        f"of them; got {type(recipe).__name__}: {recipe!r}"
    )


# What a model already holding a technique of a level is said to be, in a refusal.
HELD = {"step": "already has a step-reuse policy,", "token": "already has an attention technique,",
        "bit": "is already quantized by", "graph": "is already compiled by"}
# The model's attribute listing the accelerations applied to it and not yet removed.
ACTIVE = "_cadence_accelerations"


def active_techniques(model) -> list[TechniqueConfig]:
    """The techniques earlier ``accelerate`` calls put on ``model`` and that are still there."""
    return [handle.config for acceleration in getattr(model, ACTIVE, ())
            for handle in acceleration.handles if not handle.removed]


def _check_against_active(model, recipe: Recipe) -> None:
    active = active_techniques(model)
    for config in recipe.techniques:
        held = next((existing for existing in active if existing.level == config.level), None)
        if held is not None:
            raise ValueError(
                f"cannot apply {config}: the model {HELD.get(config.level, 'already holds')} {held}, from an earlier "
                f"accelerate() that is still active; a model holds one {ONE_PER_LEVEL.get(config.level, 'technique')}, "
                "as a recipe does: remove() that acceleration first, or put both in one recipe"
            )
    try:
        _check_compatible(tuple(active) + recipe.techniques)
    except ValueError as error:
        raise ValueError(f"{error} (with {', '.join(map(str, active))} from an earlier accelerate() that is still "
                         "active: put them in one recipe)") from None


class Acceleration:
    """The handles of one ``accelerate`` call; ``remove()`` undoes them in reverse order."""

    def __init__(self, recipe: Recipe, handles: list[Handle], model=None, parallel=None):
        self.recipe = recipe
        self.handles = handles
        self.model = model
        self.parallel = parallel  # cadence.parallel's handle, outermost: removed first
        if model is not None:
            if not hasattr(model, ACTIVE):
                setattr(model, ACTIVE, [])
            getattr(model, ACTIVE).append(self)

    def remove(self) -> None:
        if self.parallel is not None:
            self.parallel.remove()
            self.parallel = None
        for handle in reversed(self.handles):
            handle.remove()
        accelerations = getattr(self.model, ACTIVE, None)
        if accelerations is not None and self in accelerations:
            accelerations.remove(self)
            if not accelerations:
                delattr(self.model, ACTIVE)

    def notes(self) -> list[str]:
        """What did not happen as the recipe asked, in words; read after a generation. A sparse
        pattern on an attention sequence shorter than two of its blocks has no block to leave
        out, and runs at density 1."""
        notes = []
        for handle in self.handles:
            asked, stats = getattr(handle.config, "density", None), handle.stats()
            if asked is None or asked >= 1 or "sparse_calls" not in stats:
                continue
            block = getattr(handle.config, "block", None)
            # `not <`: a sequence shorter than one block reports a density of NaN (no block at all)
            if stats["sparse_calls"] and not stats.get("density", 1.0) < 0.999:
                notes.append(
                    f"{handle.config.name}: density={asked:g} was asked, but every sparse attention call kept all key "
                    f"blocks: the attention sequence is too short for {block}-token blocks to leave any out, so it "
                    "ran dense; use a smaller block= or a larger size")
            elif not stats["sparse_calls"] and stats.get("dense_calls"):
                notes.append(f"{handle.config.name}: every attention call ran dense (the dense steps and layers cover "
                             "the whole run); density was never applied")
        return notes

    def stats(self) -> dict:
        """Merged technique stats; ``compute_fraction`` multiplies across techniques."""
        merged: dict[str, Any] = self.parallel.stats() if self.parallel is not None else {}
        for handle in self.handles:
            for key, value in handle.stats().items():
                if key == "compute_fraction" and key in merged and value is not None:
                    merged[key] = merged[key] * value
                else:
                    merged[key] = value
        return merged

    def __enter__(self) -> "Acceleration":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def accelerate(target, recipe, parallel=None) -> Acceleration:
    """Apply ``recipe`` to a diffusers pipeline (its ``transformer``) or to a transformer,
    in the order of ``APPLY_ORDER`` whatever the order the recipe is written in.

    ``parallel`` (a ``cadence.parallel.ParallelConfig``, in processes started by torchrun)
    spreads each generation over the ranks once the recipe is on, so its split and gather
    hooks wrap the techniques' hooks; with ``vae=1`` the pipeline's VAE decode is split too.

    Returns an :class:`Acceleration`; ``.remove()`` gives back the exact model."""
    recipe = as_recipe(recipe)
    model = find_transformer(target)
    load_builtin()
    _check_against_active(model, recipe)
    handles: list[Handle] = []
    try:
        for config in apply_order(recipe):
            handles.append(get_technique(config.name).apply(model, config))
    except Exception:
        for handle in reversed(handles):
            handle.remove()
        raise
    spread = None
    if parallel is not None:
        from cadence.parallel import parallelize

        try:
            spread = parallelize(model, parallel, recipe.techniques, vae=getattr(target, "vae", None))
        except Exception:
            for handle in reversed(handles):
                handle.remove()
            raise
    context = get_context(model)
    if context is not None and getattr(target, "scheduler", None) is not None:
        context.scheduler = target.scheduler
    return Acceleration(recipe, handles, model, spread)
