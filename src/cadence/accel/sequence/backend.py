"""The dense backend of the KV cache's attention: the token level's ``attention-backend`` term
carried into the cache's call over [cache, chunk].

A Wan block's self-attention call is answered by one intercept: the KV cache's, when the model
streams (:mod:`cadence.accel.sequence._base`). A token-level term beneath it would see only the
cache's own call after the cache has built [cache, chunk] (or, stacked the other way, only the
chunk), so the two do not nest: the cache's stand-in runs the diffusers processor beneath the
term's stand-in itself and reads the term's backend (``backend_beneath``), and the term, applied
or removed while the cache is on, goes on or off beneath the cache's stand-ins
(``KVCache.lifted``). Either order of application builds the same processors, and either order
of removal gives the model back exactly.

Which backends (``attend``):

* ``sage`` / ``sage-fp8``: SageAttention (Zhang et al., ICLR 2025) and its SageAttention2 FP8
  form (Zhang et al., ICML 2025) on cadence's Triton kernel (``_sage_triton.sage_attention``: K
  smoothed by its mean over the tokens, Q and K per tile in INT8 or FP8, P and V in FP8), wherever
  ``supported(device)`` says it runs (FP8 GPUs, and the CPU under TRITON_INTERPRET=1 for the
  tests). Elsewhere the call takes the term's own fallback (``kernels.dense``: the kernel's PyTorch
  emulation off the GPU, SDPA for a head size other than 64 / 128), so the cache and a plain
  model fall back alike. Where it differs from SageAttention: the keys are smoothed over
  [cache, chunk] as one sequence, so the mean is that of the cached frames and the chunk together
  (SageAttention smooths one call's keys; here that call is the cache's), and a float32 model's
  tensors run the kernel in bf16 on a GPU, as the term does.
* ``auto``, ``math``, ``efficient``, ``flash``, ``cudnn``: torch's SDPA with that backend
  selected (``sdpa_kernel``); ``flex``: FlexAttention without a mask. The cache's call has no
  mask, and the chunk's queries may be fewer than the keys: every one of them takes that.

Sparse token patterns (``sparse-*``) are refused beside the cache: their block masks are built
over the model's whole token layout, and the cache's call attends a chunk to a different,
varying set of keys (the kept frames, re-indexed), which the patterns do not model.
"""

from __future__ import annotations

import torch

from cadence.accel.attention import kernels

SAGE = ("sage", "sage-fp8")


def backend_beneath(processor) -> str | None:
    """The dense backend the token-level term whose stand-in is ``processor`` chose; None for a
    processor of diffusers' own. Any other cadence stand-in is refused, with the reason."""
    from cadence.accel.attention._base import _CONTROLS, _Routed

    if isinstance(processor, _Routed):
        config = _CONTROLS[processor.handle].config
        if config.name == "attention-backend":  # by name: importing its module here would close an import circle
            return config.backend
        reason = (
            f"{config}, a sparse token pattern whose block mask covers the model's whole token layout, "
            "not the cache's [cached frames, chunk]; valid beside the KV cache: attention-backend (dense)"
        )
    elif type(processor).__module__.startswith("diffusers."):
        return None
    else:
        reason = "a cadence technique that routes the same call (another KV cache?)"
    raise ValueError(
        f"the model's self-attention processor is {type(processor).__name__}, not diffusers' own: it "
        f"already has a cadence technique ({reason}); remove it first, the KV cache routes the same call"
    )


def attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None, backend: str | None
) -> torch.Tensor:
    """The cache's attention: query (B, H, chunk tokens, D), key and value (B, H, cached + chunk
    tokens, D), on ``backend`` (None: plain SDPA, what the model itself calls)."""
    if backend is None:
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=scale)
    if backend in SAGE and query.shape[-1] in (64, 128) and kernels.triton_available():
        from cadence.accel.attention import _sage_triton as sage

        qk_format, pv_format = kernels.DENSE_BACKENDS[backend]
        if sage.supported(query.device, qk_format=qk_format, pv_format=pv_format):
            # A float32 model runs the GPU kernel in bf16 (as the term does); the interpreter takes float32.
            low = query.dtype if query.dtype in (torch.bfloat16, torch.float16) or not query.is_cuda else torch.bfloat16
            out = sage.sage_attention(
                query.to(low), key.to(low), value.to(low), scale, qk_format=qk_format, pv_format=pv_format
            )
            return out.to(query.dtype)
    return kernels.dense(query, key, value, None, scale, backend)
