"""Block-sparse attention kernels behind one call, ``attend``: a masked-dense reference in
plain PyTorch (the CPU path and the tests' ground truth), FlexAttention with a block mask
(compiled, the GPU path), and cadence's Triton kernel where Triton runs.

A ``BlockSparse`` holds one block mask in the forms the kernels read; a pattern that does
not change from step to step builds it once and every layer and step reuses it.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("auto", "reference", "flex", "triton")
DENSE_BACKENDS = {
    "auto": None,  # torch's own choice
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
    "flex": "flex",
    # SageAttention-style low precision (cadence.accel.quant._attention_triton): K smoothed,
    # Q and K in INT8 (or FP8) per block, P and V in FP8. 1.29x over cuDNN bf16 at Wan2.1-1.3B
    # size on an H100 (benchmarks/RESULTS.md, "Low-precision attention").
    "sage": ("int8", "fp8"),
    "sage-fp8": ("fp8", "fp8"),
}


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kv_blocks(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, q blocks, k blocks) bool -> (kv_num_blocks (B, H, q), kv_indices (B, H, q, k))
    int32: the kept key blocks first, ascending (a stable sort puts them first)."""
    count = mask.sum(-1, dtype=torch.int32)
    indices = torch.argsort((~mask).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
    return count, indices


class BlockSparse:
    """A block mask (B or 1, H or 1, blocks, blocks) of ``block``-token tiles over a
    sequence of ``tokens``, and the forms each kernel reads, made on first use."""

    def __init__(self, mask: torch.Tensor, block: int, tokens: int):
        self.mask, self.block, self.tokens = mask, block, tokens
        self._flex_masks: dict = {}  # (batch, heads) -> BlockMask
        self._kv_blocks: dict = {}  # (batch, heads) -> (kv_num_blocks, kv_indices)

    def expanded(self, batch: int, heads: int) -> torch.Tensor:
        return self.mask.expand(batch, heads, *self.mask.shape[-2:]).contiguous()

    def kv_blocks(self, batch: int, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """FlexAttention's (kv_num_blocks, kv_indices): per query block, how many key blocks
        it keeps and which, kept ones first in ascending order."""
        if (batch, heads) not in self._kv_blocks:
            self._kv_blocks[batch, heads] = kv_blocks(self.expanded(batch, heads))
        return self._kv_blocks[batch, heads]

    def flex_mask(self, batch: int, heads: int, key_valid: torch.Tensor | None):
        """A FlexAttention BlockMask. The mask_mod repeats the block mask token by token:
        eager FlexAttention (on the CPU) reads only the mask_mod, the compiled kernel only
        the block lists, and both must agree."""
        from torch.nn.attention.flex_attention import BlockMask

        if key_valid is None and (batch, heads) in self._flex_masks:
            return self._flex_masks[batch, heads]
        dense = self.expanded(batch, heads)
        block = self.block

        def mask_mod(b, h, q, kv):
            keep = dense[b, h, q // block, kv // block]
            return keep & key_valid[b, kv] if key_valid is not None else keep

        count, indices = self.kv_blocks(batch, heads)
        if key_valid is None:  # whole blocks: the kernel skips mask_mod inside them
            flex = BlockMask.from_kv_blocks(
                torch.zeros_like(count), indices, count, indices, BLOCK_SIZE=block,
                mask_mod=mask_mod, seq_lengths=(self.tokens, self.tokens),
            )
            self._flex_masks[batch, heads] = flex
            return flex
        return BlockMask.from_kv_blocks(
            count, indices, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(self.tokens, self.tokens)
        )

    def token_mask(self, key_valid: torch.Tensor | None) -> torch.Tensor:
        """(B or 1, H or 1, tokens, tokens) bool, for the masked-dense reference."""
        mask = self.mask.repeat_interleave(self.block, -1).repeat_interleave(self.block, -2)
        mask = mask[..., : self.tokens, : self.tokens]
        return mask & key_valid[:, None, None, :] if key_valid is not None else mask


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
) -> torch.Tensor:
    """Block-sparse attention. query, key, value: (B, H, tokens, D); key_valid: (B, tokens)
    bool, keys a padding mask hides (HunyuanVideo's padded text) -> (B, H, tokens, D)."""
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
    from cadence.accel.quant import _attention_triton as sage

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
