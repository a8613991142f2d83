"""Block-sparse attention forward in Triton (inference only, no backward).

A query block attends only its kept key blocks, listed in FlexAttention's BlockMask layout
(``kv_num_blocks``, ``kv_indices``), so the same tensors feed both kernels. The kernel is
FlashAttention-2's forward (online softmax in fp32, exp2 with log2(e) folded into the
scale), one program per (query tile, batch * head), looping over the kept key blocks only.
On Hopper, tiles move by TMA (device-side tensor descriptors); elsewhere, and for strides
TMA cannot take, by plain pointer loads.

This module imports triton: the leading underscore keeps cadence's auto-import away from
it, import it only where triton is installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from cadence.accel.attention.block_mask import BlockSparse

HEAD_DIMS = (16, 32, 64, 128)
LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class KernelConfig:
    block_m: int = 128  # query rows per program (divides block_size)
    block_n: int = 64  # key rows per inner step (divides block_size)
    num_warps: int = 8
    num_stages: int = 3
    tma: bool = True  # only taken where the hardware and the strides allow it


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_config(head_dim: int, block_size: int, device: torch.device) -> KernelConfig:
    """The fixed config table (measured on an H100 by benchmarks/attention_kernels.py)."""
    if _interpreting() or device.type != "cuda":
        # Small tiles keep the interpreter fast and exercise the inner loop of a block.
        return KernelConfig(block_m=min(block_size, 32), block_n=min(block_size, 16), tma=False)
    major, _ = torch.cuda.get_device_capability(device)
    if major >= 9:
        # The fastest tiles of `benchmarks/attention_kernels.py --sweep` on an H100 at Wan2.1-1.3B
        # size; the sweep, and what was tried and not kept (packed exp2, warp specialisation):
        # benchmarks/RESULTS.md, "Kernel tile sweeps".
        config = KernelConfig(128, 128, 8, 2, tma=False) if head_dim > 64 else KernelConfig(128, 64, 8, 3, tma=True)
    else:  # Ampere and older: no TMA; an FA2-style guess, not measured.
        config = KernelConfig(128, 64, 8 if head_dim > 64 else 4, 2 if head_dim > 64 else 3, tma=False)
    return dataclasses.replace(config, block_m=min(config.block_m, block_size), block_n=min(config.block_n, block_size))


@triton.jit
def _attend(acc, l_i, m_i, q, k_src, v_src, idx_row, stride_ii, t_lo, t_hi, seq, qk_scale,
            stride_ks, stride_kd, stride_vs, stride_vd,
            HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
            MASK_KEYS: tl.constexpr, USE_TMA: tl.constexpr):
    """Steps t_lo..t_hi over the kept key blocks, BLOCK_SIZE // BLOCK_N steps per block:
    one flat loop (not a loop per block) so the pipeliner prefetches across blocks."""
    SUB: tl.constexpr = BLOCK_SIZE // BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for t in tl.range(t_lo, t_hi):
        block = tl.load(idx_row + (t // SUB) * stride_ii)
        start_n = tl.multiple_of(block * BLOCK_SIZE + (t % SUB) * BLOCK_N, BLOCK_N)
        keys = start_n + offs_n  # (BLOCK_N,)
        if USE_TMA:
            k = k_src.load([start_n, 0])  # (BLOCK_N, D); rows past seq come back zero
        elif MASK_KEYS:
            k = tl.load(k_src + keys[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                        mask=keys[:, None] < seq, other=0.0)
        else:
            k = tl.load(k_src + keys[:, None] * stride_ks + offs_d[None, :] * stride_kd)
        qk = tl.dot(q, tl.trans(k))  # (BLOCK_M, BLOCK_N) fp32
        if MASK_KEYS:
            # Only the last key block runs past seq; its first step always has a real key,
            # so m_new is finite and exp2(-inf - m_new) = 0 drops the padding.
            qk = tl.where(keys[None, :] < seq, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            qk = qk - m_new[:, None]
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_new[:, None]
        p = tl.math.exp2(qk)  # (BLOCK_M, BLOCK_N)
        alpha = tl.math.exp2(m_i - m_new)  # (BLOCK_M,) rescales what was summed so far
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if USE_TMA:
            v = v_src.load([start_n, 0])  # (BLOCK_N, D)
        elif MASK_KEYS:  # zeros, not garbage: 0 * NaN would poison the row
            v = tl.load(v_src + keys[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                        mask=keys[:, None] < seq, other=0.0)
        else:
            v = tl.load(v_src + keys[:, None] * stride_vs + offs_d[None, :] * stride_vd)
        acc = tl.dot(p.to(v.dtype), v, acc)  # (BLOCK_M, D)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _block_sparse_fwd(Q, K, V, O, NUM, IDX, seq, heads, num_kv_blocks, qk_scale,
                      stride_qb, stride_qh, stride_qs, stride_qd,
                      stride_kb, stride_kh, stride_ks, stride_kd,
                      stride_vb, stride_vh, stride_vs, stride_vd,
                      stride_ob, stride_oh, stride_os, stride_od,
                      stride_nb, stride_nh, stride_nq,
                      stride_ib, stride_ih, stride_iq, stride_ii,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_SIZE: tl.constexpr, HAS_TAIL: tl.constexpr, USE_TMA: tl.constexpr):
    # Query tiles vary fastest over the grid: programs running together share a head, so
    # its K and V stay in L2 while they are read by every query block.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    q_block = (pid_m * BLOCK_M) // BLOCK_SIZE
    # int64 for the (batch, head) offsets: B * H * S * D can pass 2**31.
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    num = tl.load(NUM + b * stride_nb + h * stride_nh + q_block * stride_nq)
    idx_row = IDX + b * stride_ib + h * stride_ih + q_block * stride_iq

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    if USE_TMA:
        # One 2-D (seq, D) view per (batch, head): TMA zero-fills rows past seq on loads
        # and drops them on stores, so the tails need no masks.
        q_src = tl.make_tensor_descriptor(q_base, [seq, HEAD_DIM], [stride_qs, 1], [BLOCK_M, HEAD_DIM])
        k_src = tl.make_tensor_descriptor(k_base, [seq, HEAD_DIM], [stride_ks, 1], [BLOCK_N, HEAD_DIM])
        v_src = tl.make_tensor_descriptor(v_base, [seq, HEAD_DIM], [stride_vs, 1], [BLOCK_N, HEAD_DIM])
        o_dst = tl.make_tensor_descriptor(o_base, [seq, HEAD_DIM], [stride_os, 1], [BLOCK_M, HEAD_DIM])
        q = q_src.load([pid_m * BLOCK_M, 0])  # (BLOCK_M, D), loaded once for all key blocks
    else:
        k_src = k_base
        v_src = v_base
        q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                    mask=offs_m[:, None] < seq, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)  # (BLOCK_M, D)

    SUB: tl.constexpr = BLOCK_SIZE // BLOCK_N
    n_full = num
    tail_steps = 0
    if HAS_TAIL:
        # The indices ascend, so the partial last key block, if kept, is listed last: run
        # every other block unmasked and that one alone with the key mask.
        last = tl.load(idx_row + tl.maximum(num - 1, 0) * stride_ii)
        tail_kept = (num > 0) & (last == num_kv_blocks - 1)
        n_full = num - tail_kept.to(tl.int32)
        tail_len = seq - (num_kv_blocks - 1) * BLOCK_SIZE
        tail_steps = tl.where(tail_kept, tl.cdiv(tail_len, BLOCK_N), 0)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_src, v_src, idx_row, stride_ii, 0, n_full * SUB, seq, qk_scale,
                            stride_ks, stride_kd, stride_vs, stride_vd,
                            HEAD_DIM, BLOCK_N, BLOCK_SIZE, False, USE_TMA)
    if HAS_TAIL:
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_src, v_src, idx_row, stride_ii, n_full * SUB,
                                n_full * SUB + tail_steps, seq, qk_scale,
                                stride_ks, stride_kd, stride_vs, stride_vd,
                                HEAD_DIM, BLOCK_N, BLOCK_SIZE, True, USE_TMA)

    # A query block with no kept key block has l_i = 0 and acc = 0: it writes zeros.
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # (BLOCK_M, D)
    if USE_TMA:
        o_dst.store([pid_m * BLOCK_M, 0], out.to(O.dtype.element_ty))
    else:
        tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
                 out.to(O.dtype.element_ty), mask=offs_m[:, None] < seq)


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """TMA wants a contiguous last dim, 16-byte aligned bases and 16-byte multiple strides."""
    for x in tensors:
        size = x.element_size()
        if x.stride(-1) != 1 or x.data_ptr() % 16 or any((s * size) % 16 for s in x.stride()[:-1]):
            return False
    return True


def _set_allocator() -> None:
    """Device-side descriptors need a little global scratch, allocated through triton's
    allocator; install a torch one unless the caller has set their own."""
    try:
        from triton.runtime._allocation import NullAllocator, _allocator
        if not isinstance(_allocator.get(), NullAllocator):
            return
    except (ImportError, AttributeError):  # a triton whose internals moved: just set ours
        pass
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def _check(q, k, v, kv_num_blocks, kv_indices, block_size) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-D (B, H, S, D) tensor, got {getattr(x, 'shape', type(x))}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v shapes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    allowed = (torch.bfloat16, torch.float16) + ((torch.float32,) if _interpreting() else ())
    if q.dtype not in allowed:
        raise ValueError(f"dtype {q.dtype} not supported; expected one of {allowed} (float32 only under "
                         "TRITON_INTERPRET=1)")
    if not (q.device == k.device == v.device == kv_num_blocks.device == kv_indices.device):
        raise ValueError(f"tensors on different devices: q {q.device}, k {k.device}, v {v.device}, "
                         f"kv_num_blocks {kv_num_blocks.device}, kv_indices {kv_indices.device}")
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError(f"q is on {q.device}: the kernel needs a CUDA device (or TRITON_INTERPRET=1)")
    batch, heads, seq, head_dim = q.shape
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head dim D={head_dim} not supported; expected one of {HEAD_DIMS}")
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size={block_size!r} must be a power of two >= 16")
    blocks = triton.cdiv(seq, block_size)
    for name, x, tail in (("kv_num_blocks", kv_num_blocks, (blocks,)), ("kv_indices", kv_indices, (blocks, blocks))):
        if x.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {x.dtype}")
        ok = x.dim() == 2 + len(tail) and x.shape[0] in (1, batch) and x.shape[1] in (1, heads)
        if not ok or tuple(x.shape[2:]) != tail:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected ({batch} or 1, {heads} or 1, "
                             f"{', '.join(map(str, tail))}) for S={seq}, block_size={block_size}")
    if seq * max(x.stride(2) for x in (q, k, v)) >= 2**31:
        raise ValueError(f"S={seq} with row strides {q.stride(2)}, {k.stride(2)}, {v.stride(2)} overflows "
                         "the kernel's int32 in-head offsets")


def _launch(q, k, v, kv_num_blocks, kv_indices, block_size=128, scale=None, config=None, out=None):
    """block_sparse_attention with a chosen KernelConfig and output buffer (tests, tuning)."""
    _check(q, k, v, kv_num_blocks, kv_indices, block_size)
    batch, heads, seq, head_dim = q.shape
    blocks = triton.cdiv(seq, block_size)
    config = config or default_config(head_dim, block_size, q.device)
    if block_size % config.block_m or block_size % config.block_n:
        raise ValueError(f"config {config} tiles must divide block_size={block_size}")
    out = torch.empty_like(q) if out is None else out  # keeps q's strides, e.g. a (B, S, H, D) layout
    num = kv_num_blocks.expand(batch, heads, blocks)  # broadcast batch / head with stride 0
    idx = kv_indices.expand(batch, heads, blocks, blocks)
    use_tma = config.tma and (_interpreting() or (torch.cuda.get_device_capability(q.device)[0] >= 9
                                                  and _tma_ok(q, k, v, out)))
    if use_tma and not _interpreting():
        _set_allocator()
    scale = head_dim**-0.5 if scale is None else scale
    grid = (triton.cdiv(seq, config.block_m), batch * heads)
    with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
        _block_sparse_fwd[grid](
            q, k, v, out, num, idx, seq, heads, blocks, scale * LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *num.stride(), *idx.stride(),
            HEAD_DIM=head_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_SIZE=block_size,
            HAS_TAIL=seq % block_size != 0, USE_TMA=use_tma,
            num_warps=config.num_warps, num_stages=config.num_stages)
    return out


def block_sparse_attention(q, k, v, kv_num_blocks, kv_indices, block_size: int = 128,
                           scale: float | None = None) -> torch.Tensor:
    """q, k, v: (B, H, S, D), same dtype (bf16 / fp16 on the GPU; fp32 allowed under
    TRITON_INTERPRET=1), D in {16, 32, 64, 128}; any strides with the last one 1 work best
    (e.g. views of (B, S, H, D) tensors permuted to (B, H, S, D)).
    kv_num_blocks: int32 (B, H, num_q_blocks): how many key blocks each query block attends.
    kv_indices: int32 (B, H, num_q_blocks, num_kv_blocks): the attended key-block indices
    first (ascending), rest arbitrary. B and H may be 1 to broadcast. This is the
    (kv_num_blocks, kv_indices) layout of FlexAttention's BlockMask (full blocks), so the
    same tensors feed both. Values are not checked on the device (that would sync): counts
    must lie in [0, num_kv_blocks] and indices in [0, num_kv_blocks).
    The blocks are block_size x block_size tokens; S need not be a multiple of block_size.
    Returns (B, H, S, D) in q's dtype (with q's strides); a query block with 0 kept key
    blocks returns zeros."""
    return _launch(q, k, v, kv_num_blocks, kv_indices, block_size, scale)


def kv_blocks_to_dense(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor) -> torch.Tensor:
    """The inverse of block_mask.kv_blocks: (B, H, nq, nk) bool of the kept blocks."""
    blocks = kv_indices.shape[-1]
    valid = torch.arange(blocks, device=kv_indices.device) < kv_num_blocks[..., None]
    index = torch.where(valid, kv_indices, 0).long()  # the arbitrary rest may be out of range
    # scatter_add, not scatter: the rest's indices repeat kept ones and must not clear them.
    counts = torch.zeros(kv_indices.shape, dtype=torch.int32, device=kv_indices.device)
    return counts.scatter_add_(-1, index, valid.int()) > 0


def reference_block_sparse_attention(q, k, v, kv_num_blocks, kv_indices, block_size, scale=None):
    """Plain PyTorch: cadence's masked-dense reference in float32 on the same blocks; rows
    that keep no key are zeros (SDPA would give NaN)."""
    sparse = BlockSparse(kv_blocks_to_dense(kv_num_blocks, kv_indices), block_size, q.shape[-2])
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=sparse.token_mask(None),
                                         scale=scale)
    return out.masked_fill(~sparse.token_mask(None).any(-1, keepdim=True), 0.0).to(q.dtype)
