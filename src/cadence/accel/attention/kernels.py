"""Block-sparse attention kernels behind one call, ``attend``: a masked-dense reference in
plain PyTorch (the CPU path and the tests' ground truth), FlexAttention with a block mask
(compiled, the GPU path), and cadence's Triton kernel where Triton runs.

The block mask they read is a :class:`~cadence.accel.attention.block_mask.BlockSparse`.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from cadence.accel.attention.block_mask import BlockSparse

BACKENDS = ("auto", "reference", "flex", "triton")
DENSE_BACKENDS = {
    "auto": None,  # torch's own choice
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
    "flex": "flex",
    # SageAttention-style low precision (cadence.accel.attention._sage_triton): K smoothed,
    # Q and K in INT8 (or FP8) per block, P and V in FP8. Its speed over cuDNN bf16 at the
    # Wan2.1-1.3B size: benchmarks/RESULTS.md, "Low-precision attention".
    "sage": ("int8", "fp8"),
    "sage-fp8": ("fp8", "fp8"),
}
# A sparse pattern's number format -> the dense backend of the same numerics, which runs the
# pattern's dense steps and cross-attention; the kept blocks run on the block-sparse form of
# that kernel (_sage_triton.sparse_sage_attention). "bf16" is the inputs' own dtype.
PRECISIONS = {"bf16": "auto", "int8": "sage", "fp8": "sage-fp8"}


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(query, key, value, **kwargs):
    from torch.nn.attention.flex_attention import flex_attention

    run = _compiled_flex() if query.is_cuda else flex_attention
    return run(query, key, value, **kwargs)


def resolve_backend(backend: str, query: torch.Tensor, key_valid: torch.Tensor | None) -> str:
    """The kernel that runs: ``auto`` is the Triton kernel for bf16 / fp16 on a GPU where
    Triton runs and no key padding mask is needed, FlexAttention for those with one, and
    the masked-dense reference otherwise (the CPU, float32 models such as the reference
    ones, whose sequences are short)."""
    if backend != "auto":
        return backend
    if query.device.type != "cuda" or query.dtype not in (torch.bfloat16, torch.float16):
        return "reference"
    return "triton" if key_valid is None and triton_available() else "flex"


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    sparse: BlockSparse,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
    backend: str = "auto",
    precision: str = "bf16",
) -> torch.Tensor:
    """Block-sparse attention. query, key, value: (B, H, tokens, D); key_valid: (B, tokens)
    bool, keys a padding mask hides (HunyuanVideo's padded text) -> (B, H, tokens, D).
    precision: one of PRECISIONS; other than "bf16", Q K^T and P V run in low bit (_sparse_sage)."""
    if precision != "bf16":
        return _sparse_sage(query, key, value, sparse, scale, key_valid, backend, precision)
    batch, heads = query.shape[:2]
    backend = resolve_backend(backend, query, key_valid)
    if backend == "reference":
        mask = sparse.token_mask(key_valid)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
    if backend == "flex":
        return _flex(query, key, value, block_mask=sparse.flex_mask(batch, heads, key_valid), scale=scale)
    if backend == "triton":
        if key_valid is not None:
            raise ValueError("the triton attention backend takes no key padding mask; use backend='flex'")
        from cadence.accel.attention._triton import block_sparse_attention

        count, indices = sparse.kv_blocks(batch, heads)
        return block_sparse_attention(query, key, value, count, indices, sparse.block, scale=scale)
    raise ValueError(f"unknown attention backend {backend!r}; valid: {', '.join(BACKENDS)}")


def _sparse_sage(query, key, value, sparse: BlockSparse, scale, key_valid, backend: str, precision: str):
    """The kept blocks with SageAttention's numerics (_sage_triton.sparse_sage_attention): the
    Triton kernel on a GPU that runs its formats (a float32 model's tensors cast to bf16, as
    the dense sage backend does), its plain PyTorch emulation elsewhere (same numerics, float32,
    slow; a warning once) or for backend="reference". What the kernel cannot take (a key
    padding mask, a head size other than 64 / 128) runs at the inputs' precision, with a
    warning once."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; valid: {', '.join(PRECISIONS)}")
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"precision={precision!r} runs on cadence's sparse sage kernel or its reference; "
                         f"backend={backend!r} has no low-bit path (valid: auto, triton, reference)")
    reason = ("a key padding mask" if key_valid is not None
              else f"head size {query.shape[-1]}" if query.shape[-1] not in (64, 128) else None)
    if reason is not None:
        _warn_once(f"precision={precision!r}: the sparse sage kernel takes no {reason}; those calls run at the "
                   f"inputs' precision ({query.dtype})")
        return attend(query, key, value, sparse, scale, key_valid, backend)
    if not triton_available():
        raise ValueError(f"precision={precision!r} needs triton; install it or use precision='bf16'")
    from cadence.accel.attention import _sage_triton as sage

    qk_format, pv_format = DENSE_BACKENDS[PRECISIONS[precision]]
    batch, heads = query.shape[:2]
    count, indices = sparse.kv_blocks(batch, heads)
    on_gpu = query.is_cuda and sage.supported(query.device, qk_format=qk_format, pv_format=pv_format)
    if query.is_cuda and not on_gpu and backend != "reference":
        # the emulation builds (B, H, S, S) logits: at a video's token count it would run out of memory
        raise ValueError(f"precision={precision!r}: this GPU ({torch.cuda.get_device_name(query.device)}) has no FP8 "
                         "for P·V (compute capability 8.9 or later); use precision='bf16'")
    if backend == "triton" or (backend == "auto" and on_gpu):
        low = query.dtype if query.dtype in (torch.bfloat16, torch.float16) or not on_gpu else torch.bfloat16
        out = sage.sparse_sage_attention(query.to(low), key.to(low), value.to(low), count, indices, sparse.block,
                                         scale, qk_format=qk_format, pv_format=pv_format)
        return out.to(query.dtype)
    if backend == "auto":
        _warn_once(f"precision={precision!r}: no {qk_format}/{pv_format} sparse attention kernel on {query.device}; "
                   "its PyTorch emulation runs (same numerics, slower than bf16)")
    block_m, block_n = min(64, sparse.block), min(128, sparse.block)  # the H100 tiles, capped at the block
    return sage.reference_sparse_sage_attention(query, key, value, count, indices, sparse.block, scale,
                                                qk_format=qk_format, pv_format=pv_format, block_m=block_m,
                                                block_n=block_n)


def dense(query, key, value, attn_mask=None, scale=None, backend: str = "auto", **kwargs) -> torch.Tensor:
    """Dense attention on the chosen SDPA backend (or FlexAttention without a mask)."""
    choice = DENSE_BACKENDS[backend]
    if choice is None:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale, **kwargs)
    if isinstance(choice, tuple):
        return _sage(query, key, value, attn_mask, scale, backend, *choice, **kwargs)
    if choice == "flex":
        if attn_mask is not None:
            raise ValueError("dense_backend='flex' takes no attention mask")
        return _flex(query, key, value, scale=scale)
    with sdpa_kernel(choice):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale, **kwargs)


def _sage(query, key, value, attn_mask, scale, backend, qk_format, pv_format, **kwargs):
    """Low-precision dense attention; where it cannot run (a mask, a causal or dropout
    call, a head size other than 64 / 128) SDPA runs instead. Off the GPU the kernel's
    plain PyTorch emulation runs (same quantization, float32, slow), with a warning once."""
    if attn_mask is not None or kwargs.get("is_causal") or kwargs.get("dropout_p") or query.shape[-1] not in (64, 128):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale, **kwargs)
    if not triton_available():
        raise ValueError(f"dense backend {backend!r} needs triton; install it or choose another backend")
    from cadence.accel.attention import _sage_triton as sage

    if sage.supported(query.device, qk_format=qk_format, pv_format=pv_format) and query.is_cuda:
        low = query.dtype if query.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16  # float32 models
        out = sage.sage_attention(query.to(low), key.to(low), value.to(low), scale, qk_format=qk_format,
                                  pv_format=pv_format)
        return out.to(query.dtype)
    dtype = query.dtype
    _warn_once(f"{backend}: no {qk_format}/{pv_format} attention kernel on {query.device}; its PyTorch emulation runs "
               "(same numerics, slower than dense)")
    out = sage.reference_sage_attention(query, key, value, scale, qk_format=qk_format, pv_format=pv_format,
                                        block_m=64, block_n=128)  # the H100 default tiles
    return out.to(dtype)


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)
