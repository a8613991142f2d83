"""Accelerators: one folder per level of the generation loop (cache/, attention/, quant/,
vae/, kv/). Each technique is a frozen config dataclass plus ``apply(model, config)``
returning a :class:`Handle`; ``handle.remove()`` gives back the exact model."""

from cadence.accel.registry import TECHNIQUES, Handle, TechniqueConfig, get_technique, register

__all__ = ["TECHNIQUES", "Handle", "TechniqueConfig", "get_technique", "register"]
