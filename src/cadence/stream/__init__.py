"""Autoregressive, chunk-wise video generation with a bounded KV cache (issue 18).

``stream(pipe_or_transformer, prompt_embeds, chunks=..., policy=...)`` is a generator of
:class:`StreamChunk`; the cache policies and formats are the ``sequence`` terms of
:mod:`cadence.accel.sequence`; ``prompts={chunk: embeds}`` switches the prompt mid-stream
(LongLive's KV re-cache). ``cadence stream`` (:mod:`.cli`) writes a stream to a video file as it
is generated (:mod:`.writer`).
"""

from cadence.stream.engine import DEFAULT_POLICY, StreamChunk, stream

__all__ = ["DEFAULT_POLICY", "StreamChunk", "stream"]
