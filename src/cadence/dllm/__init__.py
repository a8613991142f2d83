"""Masked-diffusion language models: the decoding engine, its recipe terms and ref-dllm.

Importing this package registers the dLLM recipe terms (``sequence`` level) with cadence's
technique registry: decoding policies (policies.py) and KV caches (cache.py)."""

from cadence.dllm import cache, policies  # noqa: F401  (each registers its terms)
from cadence.dllm.engine import Generation, decode_steps, generate
from cadence.dllm.load import accelerate, load

__all__ = ["Generation", "accelerate", "decode_steps", "generate", "load"]
