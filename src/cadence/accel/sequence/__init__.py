"""The ``sequence`` level: the KV cache of chunk-wise streaming generation (``cadence.stream``).

Terms: the policies ``kv-full``, ``kv-window`` and ``kv-sink-window`` (which frames stay,
:mod:`.policies`), ``kv-pack`` (a sink, a pooled mid context and a window, :mod:`.pack`) and
``kv-format`` (how they are stored, :mod:`.formats`) and ``kv-sparse`` (which cached frames each
chunk reads, chosen per head: Light Forcing's frame level, :mod:`.sparse`). They share one cache
per model (:mod:`._base`).

They register on import (``register_terms``); ``cadence tune`` leaves the level out of its
one-shot search (``tune.space.STREAM_ONLY_LEVELS``).
"""

from cadence.accel import registry
from cadence.accel.sequence._base import KVCache, KVFormatConfig, KVPolicyConfig, apply_format
from cadence.accel.sequence.pack import PackConfig
from cadence.accel.sequence.policies import POLICIES, FullConfig, SinkWindowConfig, WindowConfig, apply
from cadence.accel.sequence.sparse import SparseConfig
from cadence.accel.sequence.sparse import apply as apply_sparse


def register_terms() -> None:
    """Make the sequence terms recipe terms (idempotent)."""
    terms = [*((policy, apply) for policy in (*POLICIES, PackConfig)), (KVFormatConfig, apply_format),
             (SparseConfig, apply_sparse)]
    for config, apply_term in terms:
        if config.name not in registry.TECHNIQUES:
            registry.register(config, apply_term)


register_terms()

__all__ = ["FullConfig", "KVCache", "KVFormatConfig", "KVPolicyConfig", "PackConfig", "SinkWindowConfig",
           "SparseConfig", "WindowConfig", "register_terms"]
