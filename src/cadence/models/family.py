"""A model family: everything cadence knows about one kind of diffusion transformer, in one
value, and the registry that finds it.

One file per family (``models/wan.py``, ``models/flux.py``, ...) writes the readers its
transformer needs and registers one :class:`Family`; nothing else in the tree names the
family. Adding a family is one such file, or one :func:`register_family` call from outside
the package (tests/models/test_new_family.py does it for a toy transformer)."""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

import torch

# The output layouts diffusers' FasterCache can split into per-frame frequency bands (0.42).
TENSOR_FORMATS = ("BCFHW", "BFCHW", "BCHW")


@dataclass(frozen=True)
class TokenLayout:
    """How one attention call's joint sequence is made: ``frames x height x width`` video
    (or image) tokens in raster order after patchifying, and ``text`` text tokens before or
    after them (joint attention, as in FLUX, SD3, CogVideoX and HunyuanVideo). Self-attention
    over video alone (Wan, LTX) has ``text = 0``."""

    frames: int
    height: int
    width: int
    text: int = 0
    text_first: bool = False

    @property
    def video(self) -> int:
        return self.frames * self.height * self.width

    @property
    def tokens(self) -> int:
        return self.video + self.text


@dataclass(frozen=True)
class FamilyRecipe:
    """A family's default fast recipe (``cadence recipes --model FAMILY``). The recipe is a
    string, parsed by whoever applies it: ``cadence.models`` never imports the techniques."""

    recipe: str
    measured: str  # what supports it, with the RESULTS.md figures
    needs: str = "a MagCache calibration of the model: cadence calibrate --model DIR --technique magcache"


# (model, forward args, forward kwargs) -> the layout of the joint attention sequence
LayoutReader = Callable[[torch.nn.Module, tuple, dict], TokenLayout]
# (first block, its args, its kwargs, its input hidden states) -> (B, tokens, dim)
ModulatedInputReader = Callable[[torch.nn.Module, tuple, dict, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Family:
    """One model family.

    - ``classes``: the transformer class names it adapts (matched by exact name).
    - ``blocks``: the block-list attributes, in the order the forward runs them. The block
      metadata (which output is the hidden state, which the text stream) comes from diffusers'
      ``TransformerBlockRegistry``, so the block classes must be registered there.
    - ``token_layout``: reads the joint attention's layout from the transformer's forward
      arguments (sparse attention builds its masks from it).
    - ``attention``: the block attributes that hold self- or joint attention, modules whose
      ``processor`` (as in diffusers) calls ``scaled_dot_product_attention``. Cross-attention
      to text (Wan's and LTX's ``attn2``) is never listed: it stays dense.
    - ``recipe``, ``sparse_pattern``: the default fast recipe and the default sparse pattern
      (recipe strings; models/defaults.py says how they were chosen).
    - ``modulated_input``: reads the first block's timestep-modulated input (TeaCache's
      indicator); None falls back to the block's input hidden states.
    - ``timestep_scale``: what the ``timestep`` argument is multiplied by to give diffusers'
      0-1000 timestep (FLUX's transformer is passed ``t / 1000`` and multiplies it back).
    - ``tensor_format``: the layout of the transformer's output, for diffusers' FasterCache
      CFG-Cache (which splits it frame by frame into frequency bands); None where it is not
      one diffusers can split.
    - ``references``: cadence's reference models built on this family's class (``ref-video``).
    """

    name: str
    classes: tuple[str, ...]
    blocks: tuple[str, ...]
    token_layout: LayoutReader
    attention: tuple[str, ...]
    recipe: FamilyRecipe
    sparse_pattern: str
    modulated_input: ModulatedInputReader | None = None
    timestep_scale: float = 1.0
    tensor_format: str | None = None
    references: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a family needs a name, got {self.name!r}")
        for field in ("classes", "blocks", "attention", "references"):
            value = getattr(self, field)
            if not isinstance(value, tuple) or not all(isinstance(item, str) and item for item in value):
                raise ValueError(f"family {self.name!r}: {field}={value!r} must be a tuple of names")
        for field in ("classes", "blocks", "attention"):
            if not getattr(self, field):
                raise ValueError(f"family {self.name!r}: {field} must name at least one")
        if not self.timestep_scale > 0:
            raise ValueError(f"family {self.name!r}: timestep_scale={self.timestep_scale} must be > 0")
        if self.tensor_format not in (None, *TENSOR_FORMATS):
            raise ValueError(f"family {self.name!r}: tensor_format={self.tensor_format!r} must be None or one of "
                             f"{', '.join(TENSOR_FORMATS)}")

    @property
    def names(self) -> tuple[str, ...]:
        """Every name the family answers to: its own, its class names, its reference models."""
        return (self.name, *self.classes, *self.references)


_FAMILIES: dict[str, Family] = {}  # family name -> family, in registration order


def register_family(family: Family) -> Family:
    """Make ``family`` known to every accelerator; refuses a name another family answers to."""
    taken = {name: other.name for other in _FAMILIES.values() for name in other.names}
    clashes = [f"{name!r} (family {taken[name]!r})" for name in family.names if name in taken]
    if clashes:
        raise ValueError(f"cannot register family {family.name!r}: already registered: {', '.join(clashes)}")
    _FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> Family:
    """Forget a registered family (by family name); returns it."""
    if name not in _FAMILIES:
        raise KeyError(f"no family {name!r} registered; registered: {', '.join(_FAMILIES)}")
    return _FAMILIES.pop(name)


def families() -> tuple[Family, ...]:
    """The registered families, in registration order."""
    return tuple(_FAMILIES.values())


def find_family(name: str) -> Family | None:
    """The family answering to ``name`` (a family name, a transformer class name or a
    reference model's name), or None."""
    if name in _FAMILIES:
        return _FAMILIES[name]
    return next((family for family in _FAMILIES.values() if name in family.names), None)


def argument(args: tuple, kwargs: dict, name: str, index: int):
    """A block or transformer argument that a forward passes by keyword or by position."""
    return kwargs[name] if name in kwargs else args[index]
