"""Accelerators: one folder per level of the generation loop that a technique removes work
from (``cache/``: whole steps, ``attention/``: query-key pairs, ``quant/``: bits, and
``compile.py``: the graph). Each technique is a frozen config dataclass plus ``apply(model,
config)`` returning a :class:`Handle`, registered once with everything it has
(``registry.register``); ``handle.remove()`` gives back the exact model. What several
techniques share lives here at the top (``registry``, ``calibration``), never inside a
technique folder, and no technique folder imports a sibling (tests/test_structure.py)."""

from cadence.accel.registry import TECHNIQUES, Handle, TechniqueConfig, get_technique, register

__all__ = ["TECHNIQUES", "Handle", "TechniqueConfig", "get_technique", "register"]
