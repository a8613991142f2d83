"""Masked-diffusion language models: the decoding engine, its recipe terms and ref-dllm.

Importing this package registers the dLLM recipe terms (``sequence`` level) with cadence's
technique registry: decoding policies (policies.py), Fast-dLLM's KV caches (cache.py), the
refresh-rule caches dKV-Cache and Elastic-Cache (cache_refresh.py) and the feature caches
dLLM-Cache and SPA-Cache (cache_features.py), and sparse attention over the prompt
(sparse.py). transformers' DiffusionGemma is adapted in gemma.py (its own block-causal
canvas; which terms apply there and which are refused)."""

from cadence.dllm import cache, cache_features, cache_refresh, gemma, policies, sparse  # noqa: F401  (register terms)
from cadence.dllm.engine import Generation, decode_steps, generate
from cadence.dllm.load import accelerate, load

__all__ = ["Generation", "accelerate", "decode_steps", "generate", "load"]
