"""Autoregressive, chunk-wise video generation with a bounded KV cache (issue 18).

``stream(pipe_or_transformer, prompt_embeds, chunks=..., policy=...)`` is a generator of
:class:`StreamChunk`; the cache policies and formats are the ``sequence`` terms of
:mod:`cadence.accel.sequence`.
"""

from cadence.stream.engine import DEFAULT_POLICY, StreamChunk, stream

__all__ = ["DEFAULT_POLICY", "StreamChunk", "stream"]
