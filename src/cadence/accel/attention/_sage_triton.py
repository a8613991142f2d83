"""Low-precision dense attention forward in Triton, SageAttention style (inference only).

SageAttention (Zhang et al., 2024) and SageAttention2 (Zhang et al., 2025):
  * smooth K: subtract K's mean over tokens (per batch, head, channel). Each query row's
    logits move by one constant (q . mean), which softmax ignores, and the channel
    outliers that K shares across tokens stop eating the low-bit range;
  * Q and K quantized per block of rows (one scale per BLOCK_M query rows, per BLOCK_N key
    rows, per head) to INT8 (qk_format="int8") or FP8 e4m3 (qk_format="fp8"); the
    softmax scale and log2(e) ride in Q's block scale, so the kernel uses exp2;
  * P V in FP8 (pv_format="fp8"): V quantized per channel (per head, per D column), P (in
    [0, 1] after the online-softmax subtraction) cast in-kernel as P * 448, which the row
    sum divides out again; each key block's P V product starts from a fresh fp32
    accumulator and is added to the running one in fp32 (SageAttention2's two-level
    accumulation: Hopper's FP8 MMA keeps fewer accumulator bits than fp32).
    pv_format="bf16" keeps P and V in the inputs' 16-bit dtype (the accuracy fallback).
The attention kernel is FlashAttention-2's forward (online softmax in fp32), one program
per (query tile, batch * head). Quantization is four small Triton kernels (one pass for
K's column means and V's column maxima, then one read and one write per tensor), timed as
part of the call.

sparse_sage_attention is its block-sparse form (SpargeAttn, Zhang et al. 2025: sparse
attention on SageAttention's kernel): the same quantization and the same per-tile update
(_scores, _update), each query tile looping over its kept key blocks only, given as the
(kv_num_blocks, kv_indices) lists of _triton.block_sparse_attention. Its tiles are the dense
kernel's capped at the mask's block size, so a Q or K scale never spans two mask blocks;
with every block kept it is the dense kernel, bit for bit.

This module imports triton: the leading underscore keeps cadence's auto-import away from
it. The dense kernel imports nothing from cadence, so it also loads by path where cadence's
own dependencies are missing (benchmarks/quant_attention.py does that on the GPU machine);
the block-sparse entry points import _triton's block-list contract when called.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

QK_FORMATS = ("int8", "fp8")
PV_FORMATS = ("fp8", "bf16")
HEAD_DIMS = (64, 128)
EXP_MODES = ("libdevice", "ftz", "f16x2")
LOG2E = 1.4426950408889634
INT8_MAX = 127.0
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
# P * 448 lands just under 448: exp2's last-bit error must not push P past fp8's range.
P_LOG2_SCALE = math.log2(FP8_MAX) - 2.0**-12
# 1.5 * 2**23: for |i| < 2**22, the float whose bits are MAGIC_BITS + i is exactly MAGIC + i,
# which turns an int32 into a float (and back) with integer adds instead of conversions.
MAGIC = 12582912.0
MAGIC_BITS = 0x4B400000
AMAX_FLOOR = 1e-20  # an all-zero block gets a finite scale (and quantizes to zeros)

_FP8_MAX = tl.constexpr(FP8_MAX)
_INT8_MAX = tl.constexpr(INT8_MAX)
_P_LOG2_SCALE = tl.constexpr(P_LOG2_SCALE)
_MAGIC = tl.constexpr(MAGIC)
_MAGIC_BITS = tl.constexpr(MAGIC_BITS)
_AMAX_FLOOR = tl.constexpr(AMAX_FLOOR)


@dataclass(frozen=True)
class KernelConfig:
    block_m: int = 128  # query rows per program, and per Q scale
    block_n: int = 128  # key rows per inner step, and per K scale
    num_warps: int = 8
    num_stages: int = 3
    magic_int8: bool = False  # int8 QK: the int32 accumulator starts at MAGIC_BITS, read as float
    exp: str = "ftz"  # exp2 as: "libdevice" (tl.math.exp2), "ftz" (ex2.approx.ftz.f32), "f16x2"
    pipeline: bool = False  # issue the next block's Q K^T before this block's softmax
    two_level: bool = True  # fp8 P V: a fresh MMA accumulator per key block, added in fp32
    warp_specialize: bool = False  # tl.range(warp_specialize=True) on the key loop
    maxnreg: int | None = None  # a register cap per thread, to fit more programs per SM

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            size = getattr(self, name)
            if not isinstance(size, int) or size < 16 or size & (size - 1):
                raise ValueError(f"{name}={size!r} must be a power of two >= 16")
        if self.exp not in EXP_MODES:
            raise ValueError(f"exp={self.exp!r}; expected one of {EXP_MODES}")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_config(head_dim: int, device: torch.device, qk_format: str = "int8",
                   pv_format: str = "fp8") -> KernelConfig:
    """The fixed config table (measured on an H100 by benchmarks/quant_attention.py --sweep)."""
    if _interpreting() or device.type != "cuda":
        # Small tiles keep the interpreter fast and run the inner loop several times; the
        # interpreter has no inline PTX, so exp2 is the library one.
        return KernelConfig(block_m=32, block_n=16, num_warps=4, num_stages=1, exp="libdevice")
    major, _ = torch.cuda.get_device_capability(device)
    if major >= 9:
        # The fastest tiles of `benchmarks/quant_attention.py --sweep` on an H100 at Wan2.1-1.3B
        # size (D = 128; D = 64 not measured, the same tiles); the sweep, and why magic_int8
        # and the other variants lost: benchmarks/RESULTS.md, "Kernel tile sweeps".
        if pv_format == "fp8":
            return KernelConfig(64, 128, 4, 3, magic_int8=False, exp="ftz")
        return KernelConfig(128, 64, 8, 2, magic_int8=False, exp="ftz", maxnreg=128)
    # Ada / Ampere: an FA2-style guess, not measured.
    return KernelConfig(64, 128, 4, 2, exp="ftz")


def supported(device, *, qk_format: str = "int8", pv_format: str = "fp8") -> bool:
    """Whether the kernel runs on ``device`` with these formats: FP8 (either format) needs
    CUDA capability >= 8.9 (Ada, Hopper), INT8 QK with 16-bit P V needs >= 8.0. Under
    TRITON_INTERPRET=1 the CPU runs it too (slowly: tests only)."""
    device = torch.device(device)
    if device.type != "cuda":
        return _interpreting() and device.type == "cpu"
    if not torch.cuda.is_available():
        return False
    need = (8, 9) if "fp8" in (qk_format, pv_format) else (8, 0)
    return torch.cuda.get_device_capability(device) >= need


# ----------------------------------------------------------------------------------------
# Elementwise helpers


@triton.jit
def _to_e4m3(x, EXACT: tl.constexpr):
    """x (|x| <= 448) to float8_e4m3fn, round to nearest even. EXACT: snap x onto the fp8
    grid in fp32 first, for Triton's interpreter, whose own fp32 -> fp8 cast truncates
    subnormals and drops the carry of a rounding into the exponent (triton 3.9); on the
    GPU the cast (cvt.rn.satfinite) is already exact."""
    if EXACT:
        x = tl.minimum(tl.maximum(x, -_FP8_MAX), _FP8_MAX)
        bits = x.to(tl.int32, bitcast=True)
        # Keep 3 of 23 mantissa bits, ties to even; a carry moves into the exponent.
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
        subnormal = ((x * 512.0 + _MAGIC) - _MAGIC) / 512.0  # multiples of 2**-9
        x = tl.where(tl.abs(x) < 0.015625, subnormal, normal)
    return x.to(tl.float8e4nv)


@triton.jit
def _round_int8(x):
    """Round to nearest even and clamp to [-127, 127]: adding MAGIC rounds in fp32 and the
    bits are then the integer (no float -> int conversion instruction)."""
    x = tl.minimum(tl.maximum(x, -_INT8_MAX), _INT8_MAX)
    return ((x + _MAGIC).to(tl.int32, bitcast=True) - _MAGIC_BITS).to(tl.int8)


@triton.jit
def _exp2(x, EXP: tl.constexpr):
    """2**x. EXP 1: ex2.approx.ftz.f32, one MUFU op (tl.math.exp2 adds the denormal
    handling of ex2.approx.f32); EXP 2: ex2.approx.f16x2, two per MUFU op, f16 result
    (exact enough for an fp8 P); EXP 0: tl.math.exp2 (the interpreter's)."""
    if EXP == 1:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    elif EXP == 2:
        return tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [x.to(tl.float16)],
                                         dtype=tl.float16, is_pure=True, pack=2)
    else:
        return tl.math.exp2(x)


# ----------------------------------------------------------------------------------------
# Quantization kernels: (B, H, S, D) in any strides -> (B*H, S_pad, D) rows or (B*H, D, S_pad)


@triton.jit
def _column_stats(K, V, K_PARTS, V_PARTS, seq, heads, stride_kb, stride_kh, stride_ks, stride_kd,
                  stride_vb, stride_vh, stride_vs, stride_vd,
                  HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, CHUNK: tl.constexpr, WITH_V: tl.constexpr):
    """Per (chunk of CHUNK tokens, batch * head): K's column sums and (WITH_V) V's column abs
    maxima, into K_PARTS / V_PARTS (B*H, n_chunks, D); the quantize kernels finish the
    reduction over chunks. One launch for both keeps twice the bytes in flight."""
    chunk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    offs_r = tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    k_sum = tl.zeros([HEAD_DIM], tl.float32)
    v_max = tl.zeros([HEAD_DIM], tl.float32)
    for start in tl.range(chunk * CHUNK, chunk * CHUNK + CHUNK, ROWS):
        rows = start + offs_r
        valid = rows[:, None] < seq
        k = tl.load(k_base + rows[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=valid, other=0.0)
        k_sum += tl.sum(k.to(tl.float32), 0)
        if WITH_V:
            v = tl.load(v_base + rows[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=valid, other=0.0)
            v_max = tl.maximum(v_max, tl.max(tl.abs(v.to(tl.float32)), 0))
    part = (bh * tl.num_programs(0) + chunk) * HEAD_DIM + offs_d
    tl.store(K_PARTS + part, k_sum)
    if WITH_V:
        tl.store(V_PARTS + part, v_max)


@triton.jit
def _quantize_rows(X, PARTS, XQ, XS, seq, seq_pad, heads, n_chunks, scale_mult,
                   stride_b, stride_h, stride_s, stride_d,
                   HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, N_CHUNKS: tl.constexpr,
                   SMOOTH: tl.constexpr, FP8: tl.constexpr, EXACT_FP8: tl.constexpr):
    """One block of BLOCK rows: (x - column mean if SMOOTH) -> one absmax scale -> int8 or
    fp8 rows in XQ (B*H, seq_pad, D), zeros past seq; XS (B*H, seq_pad // BLOCK) gets
    scale * scale_mult."""
    block = tl.program_id(0)
    bh = tl.program_id(1)
    base = X + (bh // heads).to(tl.int64) * stride_b + (bh % heads).to(tl.int64) * stride_h
    rows = block * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    valid = rows[:, None] < seq
    x = tl.load(base + rows[:, None] * stride_s + offs_d[None, :] * stride_d, mask=valid, other=0.0)
    x = x.to(tl.float32)  # (BLOCK, D)
    if SMOOTH:
        chunks = tl.arange(0, N_CHUNKS)
        parts = tl.load(PARTS + (bh * n_chunks + chunks[:, None]) * HEAD_DIM + offs_d[None, :],
                        mask=chunks[:, None] < n_chunks, other=0.0)
        mean = tl.sum(parts, 0) / seq  # (D,)
        x = tl.where(valid, x - mean[None, :], 0.0)
    amax = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), _AMAX_FLOOR)
    if FP8:
        xq = _to_e4m3(x * (_FP8_MAX / amax), EXACT_FP8)
        scale = amax / _FP8_MAX
    else:
        xq = _round_int8(x * (_INT8_MAX / amax))
        scale = amax / _INT8_MAX
    tl.store(XQ + bh.to(tl.int64) * seq_pad * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :], xq)
    tl.store(XS + bh * (seq_pad // BLOCK) + block, scale * scale_mult)


@triton.jit
def _quantize_v_transposed(V, PARTS, VT, VS, seq, seq_pad, heads, n_chunks,
                           stride_b, stride_h, stride_s, stride_d,
                           HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, N_CHUNKS: tl.constexpr,
                           EXACT_FP8: tl.constexpr):
    """V per channel to fp8, stored transposed in VT (B*H, D, seq_pad): Hopper's FP8 MMA
    takes its B operand K-major, and for P V the K dimension is the tokens. VS (B*H, D)
    gets the channel scales."""
    block = tl.program_id(0)
    bh = tl.program_id(1)
    base = V + (bh // heads).to(tl.int64) * stride_b + (bh % heads).to(tl.int64) * stride_h
    rows = block * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    x = tl.load(base + rows[:, None] * stride_s + offs_d[None, :] * stride_d,
                mask=rows[:, None] < seq, other=0.0).to(tl.float32)  # (BLOCK, D)
    chunks = tl.arange(0, N_CHUNKS)
    parts = tl.load(PARTS + (bh * n_chunks + chunks[:, None]) * HEAD_DIM + offs_d[None, :],
                    mask=chunks[:, None] < n_chunks, other=0.0)
    amax = tl.maximum(tl.max(parts, 0), _AMAX_FLOOR)  # (D,)
    inverse = _FP8_MAX / amax  # (D,)
    xq = _to_e4m3(x * inverse[None, :], EXACT_FP8)
    tl.store(VT + bh.to(tl.int64) * HEAD_DIM * seq_pad + offs_d[:, None] * seq_pad + rows[None, :], tl.trans(xq))
    if block == 0:
        tl.store(VS + bh * HEAD_DIM + offs_d, amax / _FP8_MAX)


# ----------------------------------------------------------------------------------------
# Attention kernel


@triton.jit
def _scores(q, q_scale, k_base, ks_base, start_n, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, QK_INT8: tl.constexpr, MAGIC_INT8: tl.constexpr):
    """The logits of one key block, (BLOCK_M, BLOCK_N) fp32 before scaling (plus MAGIC with
    MAGIC_INT8), and their scale: q_scale (softmax scale * log2(e) * Q's block scale) times
    K's block scale, so that (x - shift) * scale is in log2 units."""
    keys = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(k_base + keys[:, None] * HEAD_DIM + offs_d[None, :])  # (BLOCK_N, D), zero-padded rows
    scale = q_scale * tl.load(ks_base + start_n // BLOCK_N)
    if QK_INT8:
        if MAGIC_INT8:
            # The accumulator starts at MAGIC_BITS: its bits read as a float are MAGIC + q.k
            # exactly (|q.k| <= 128 * 127**2 < 2**22), with no int -> float conversion.
            init = tl.full([BLOCK_M, BLOCK_N], _MAGIC_BITS, tl.int32)
            x = tl.dot(q, tl.trans(k), init, out_dtype=tl.int32).to(tl.float32, bitcast=True)
        else:
            x = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
    else:
        x = tl.dot(q, tl.trans(k))
    return x, scale


@triton.jit
def _update(acc, l_i, m_i, x, scale, start_n, v_base, seq_kv, stride_vs, stride_vd,
            HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, QK_INT8: tl.constexpr, PV_FP8: tl.constexpr,
            MAGIC_INT8: tl.constexpr, EXP: tl.constexpr, EXACT_FP8: tl.constexpr, TWO_LEVEL: tl.constexpr,
            MASK_KEYS: tl.constexpr):
    """One key block's logits x into the online softmax (FlashAttention-2) and P V."""
    keys = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if QK_INT8 and MAGIC_INT8:
        shift = _MAGIC
    else:
        shift = 0.0
    if MASK_KEYS:  # the last key block only; it always holds a real key, so m_new is finite
        x = tl.where(keys[None, :] < seq_kv, x, float("-inf"))
    m_new = tl.maximum(m_i, (tl.max(x, 1) - shift) * scale)  # (BLOCK_M,) running max, log2 units
    # One FMA per logit: (x - shift) * scale - m_new, plus log2(448) for an fp8 P.
    row_offset = m_new + shift * scale
    if PV_FP8:
        row_offset -= _P_LOG2_SCALE
    p = _exp2(x * scale - row_offset[:, None], EXP)  # (BLOCK_M, BLOCK_N)
    if EXP == 2:  # alpha rescales what was summed so far: keep it f32
        alpha = _exp2(m_i - m_new, 1)
    else:
        alpha = _exp2(m_i - m_new, EXP)
    l_i = l_i * alpha + tl.sum(p.to(tl.float32), 1)
    if PV_FP8:
        vt = tl.load(v_base + offs_d[:, None] * stride_vd + keys[None, :])  # (D, BLOCK_N), zero-padded
        if TWO_LEVEL:  # a fresh accumulator per block, summed in fp32 (SageAttention2)
            acc = acc * alpha[:, None] + tl.dot(_to_e4m3(p, EXACT_FP8), tl.trans(vt))
        else:
            acc = tl.dot(_to_e4m3(p, EXACT_FP8), tl.trans(vt), acc * alpha[:, None])
    else:
        if MASK_KEYS:  # zeros, not garbage: 0 * NaN would poison the row
            v = tl.load(v_base + keys[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                        mask=keys[:, None] < seq_kv, other=0.0)
        else:
            v = tl.load(v_base + keys[:, None] * stride_vs + offs_d[None, :] * stride_vd)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])  # (BLOCK_M, D)
    return acc, l_i, m_new


@triton.jit
def _attend(acc, l_i, m_i, q, q_scale, k_base, ks_base, v_base, lo, hi, seq_kv, stride_vs, stride_vd,
            HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            QK_INT8: tl.constexpr, PV_FP8: tl.constexpr, MAGIC_INT8: tl.constexpr, EXP: tl.constexpr,
            EXACT_FP8: tl.constexpr, TWO_LEVEL: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
            MASK_KEYS: tl.constexpr):
    """Key blocks lo..hi (steps of BLOCK_N), one after the other."""
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        x, scale = _scores(q, q_scale, k_base, ks_base, start_n, HEAD_DIM, BLOCK_M, BLOCK_N, QK_INT8, MAGIC_INT8)
        acc, l_i, m_i = _update(acc, l_i, m_i, x, scale, start_n, v_base, seq_kv, stride_vs, stride_vd,
                                HEAD_DIM, BLOCK_N, QK_INT8, PV_FP8, MAGIC_INT8, EXP, EXACT_FP8, TWO_LEVEL,
                                MASK_KEYS)
    return acc, l_i, m_i


@triton.jit
def _attend_pipelined(acc, l_i, m_i, q, q_scale, k_base, ks_base, v_base, lo, hi, seq_kv, stride_vs, stride_vd,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      QK_INT8: tl.constexpr, PV_FP8: tl.constexpr, MAGIC_INT8: tl.constexpr, EXP: tl.constexpr,
                      EXACT_FP8: tl.constexpr, TWO_LEVEL: tl.constexpr):
    """Full key blocks lo..hi (hi > lo), the next block's Q K^T issued before this block's
    softmax (FlashAttention-3's intra-warpgroup overlap): the tensor cores work on the next
    logits while the exp2 and FMA units work on these."""
    x, scale = _scores(q, q_scale, k_base, ks_base, lo, HEAD_DIM, BLOCK_M, BLOCK_N, QK_INT8, MAGIC_INT8)
    for start_n in tl.range(lo + BLOCK_N, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        x_next, scale_next = _scores(q, q_scale, k_base, ks_base, start_n, HEAD_DIM, BLOCK_M, BLOCK_N,
                                     QK_INT8, MAGIC_INT8)
        acc, l_i, m_i = _update(acc, l_i, m_i, x, scale, start_n - BLOCK_N, v_base, seq_kv, stride_vs, stride_vd,
                                HEAD_DIM, BLOCK_N, QK_INT8, PV_FP8, MAGIC_INT8, EXP, EXACT_FP8, TWO_LEVEL, False)
        x = x_next
        scale = scale_next
    return _update(acc, l_i, m_i, x, scale, hi - BLOCK_N, v_base, seq_kv, stride_vs, stride_vd,
                   HEAD_DIM, BLOCK_N, QK_INT8, PV_FP8, MAGIC_INT8, EXP, EXACT_FP8, TWO_LEVEL, False)


@triton.jit
def _sage_fwd(Q, K, V, QS, KS, VS, O, seq_q, seq_kv, seq_q_pad, seq_kv_pad, heads,
              stride_vb, stride_vh, stride_vs, stride_vd,
              stride_ob, stride_oh, stride_os, stride_od,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              QK_INT8: tl.constexpr, PV_FP8: tl.constexpr, MAGIC_INT8: tl.constexpr, EXP: tl.constexpr,
              EXACT_FP8: tl.constexpr, TWO_LEVEL: tl.constexpr, PIPELINE: tl.constexpr,
              WARP_SPECIALIZE: tl.constexpr, HAS_TAIL: tl.constexpr):
    # Query tiles vary fastest over the grid: programs running together share a head, so
    # its K and V stay in L2 while every query tile reads them.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    # Quantized Q and K are (B*H, S_pad, D) with zero rows past S: no load masks.
    q = tl.load(Q + bh.to(tl.int64) * seq_q_pad * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :])
    q_scale = tl.load(QS + bh * (seq_q_pad // BLOCK_M) + pid_m)
    k_base = K + bh.to(tl.int64) * seq_kv_pad * HEAD_DIM
    ks_base = KS + bh * (seq_kv_pad // BLOCK_N)
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)  # (BLOCK_M, D)
    full_end = (seq_kv // BLOCK_N) * BLOCK_N
    if PIPELINE:
        if full_end > 0:
            acc, l_i, m_i = _attend_pipelined(acc, l_i, m_i, q, q_scale, k_base, ks_base, v_base, 0, full_end,
                                              seq_kv, stride_vs, stride_vd, HEAD_DIM, BLOCK_M, BLOCK_N, QK_INT8,
                                              PV_FP8, MAGIC_INT8, EXP, EXACT_FP8, TWO_LEVEL)
    else:
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, q_scale, k_base, ks_base, v_base, 0, full_end, seq_kv,
                                stride_vs, stride_vd, HEAD_DIM, BLOCK_M, BLOCK_N, QK_INT8, PV_FP8,
                                MAGIC_INT8, EXP, EXACT_FP8, TWO_LEVEL, WARP_SPECIALIZE, False)
    if HAS_TAIL:
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, q_scale, k_base, ks_base, v_base, full_end, full_end + BLOCK_N,
                                seq_kv, stride_vs, stride_vd, HEAD_DIM, BLOCK_M, BLOCK_N, QK_INT8, PV_FP8,
                                MAGIC_INT8, EXP, EXACT_FP8, TWO_LEVEL, False, True)
    if PV_FP8:  # V's channel scales come back here, once per output element
        v_scale = tl.load(VS + bh * HEAD_DIM + offs_d)
        out = acc * v_scale[None, :] * (1.0 / l_i)[:, None]
    else:
        out = acc * (1.0 / l_i)[:, None]
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od, out.to(O.dtype.element_ty),
             mask=offs_m[:, None] < seq_q)


@triton.jit
def _attend_kept(acc, l_i, m_i, q, q_scale, k_base, ks_base, v_base, idx_row, stride_ii, t_lo, t_hi, seq_kv,
                 stride_vs, stride_vd,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                 QK_INT8: tl.constexpr, PV_FP8: tl.constexpr, MAGIC_INT8: tl.constexpr, EXP: tl.constexpr,
                 EXACT_FP8: tl.constexpr, TWO_LEVEL: tl.constexpr, MASK_KEYS: tl.constexpr):
    """Steps t_lo..t_hi over the kept key blocks listed at idx_row, BLOCK_SIZE // BLOCK_N steps
    per block, each step the dense kernel's _scores and _update on one tile of BLOCK_N keys
    (and one K scale): one flat loop, as _triton._attend, so the pipeliner prefetches across
    blocks."""
    SUB: tl.constexpr = BLOCK_SIZE // BLOCK_N
    for t in tl.range(t_lo, t_hi):
        block = tl.load(idx_row + (t // SUB) * stride_ii)
        start_n = tl.multiple_of(block * BLOCK_SIZE + (t % SUB) * BLOCK_N, BLOCK_N)
        x, scale = _scores(q, q_scale, k_base, ks_base, start_n, HEAD_DIM, BLOCK_M, BLOCK_N, QK_INT8, MAGIC_INT8)
        acc, l_i, m_i = _update(acc, l_i, m_i, x, scale, start_n, v_base, seq_kv, stride_vs, stride_vd,
                                HEAD_DIM, BLOCK_N, QK_INT8, PV_FP8, MAGIC_INT8, EXP, EXACT_FP8, TWO_LEVEL,
                                MASK_KEYS)
    return acc, l_i, m_i


@triton.jit
def _sparse_sage_fwd(Q, K, V, QS, KS, VS, O, NUM, IDX, seq, seq_pad_q, seq_pad_kv, heads, num_kv_blocks,
                     stride_vb, stride_vh, stride_vs, stride_vd,
                     stride_ob, stride_oh, stride_os, stride_od,
                     stride_nb, stride_nh, stride_nq,
                     stride_ib, stride_ih, stride_iq, stride_ii,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     QK_INT8: tl.constexpr, PV_FP8: tl.constexpr, MAGIC_INT8: tl.constexpr, EXP: tl.constexpr,
                     EXACT_FP8: tl.constexpr, TWO_LEVEL: tl.constexpr, HAS_TAIL: tl.constexpr):
    """_sage_fwd over the kept key blocks only: one program per (query tile, batch * head),
    the tile inside query block (pid_m * BLOCK_M) // BLOCK_SIZE of the block mask."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    q_block = (pid_m * BLOCK_M) // BLOCK_SIZE
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    # Quantized Q and K are (B*H, S_pad, D) with zero rows past S: no load masks.
    q = tl.load(Q + bh.to(tl.int64) * seq_pad_q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :])
    q_scale = tl.load(QS + bh * (seq_pad_q // BLOCK_M) + pid_m)
    k_base = K + bh.to(tl.int64) * seq_pad_kv * HEAD_DIM
    ks_base = KS + bh * (seq_pad_kv // BLOCK_N)
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    num = tl.load(NUM + b * stride_nb + h * stride_nh + q_block * stride_nq)
    idx_row = IDX + b * stride_ib + h * stride_ih + q_block * stride_iq

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)  # (BLOCK_M, D)
    SUB: tl.constexpr = BLOCK_SIZE // BLOCK_N
    n_full = num
    tail_steps = 0
    if HAS_TAIL:
        # The indices ascend, so the partial last key block, if kept, is listed last: every
        # other block runs unmasked, that one alone with the key mask, and only over the
        # steps that hold a real key (_update's mask needs one per step for a finite max).
        last = tl.load(idx_row + tl.maximum(num - 1, 0) * stride_ii)
        tail_kept = (num > 0) & (last == num_kv_blocks - 1)
        n_full = num - tail_kept.to(tl.int32)
        tail_len = seq - (num_kv_blocks - 1) * BLOCK_SIZE
        tail_steps = tl.where(tail_kept, tl.cdiv(tail_len, BLOCK_N), 0)
    acc, l_i, m_i = _attend_kept(acc, l_i, m_i, q, q_scale, k_base, ks_base, v_base, idx_row, stride_ii,
                                 0, n_full * SUB, seq, stride_vs, stride_vd, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_SIZE,
                                 QK_INT8, PV_FP8, MAGIC_INT8, EXP, EXACT_FP8, TWO_LEVEL, False)
    if HAS_TAIL:
        acc, l_i, m_i = _attend_kept(acc, l_i, m_i, q, q_scale, k_base, ks_base, v_base, idx_row, stride_ii,
                                     n_full * SUB, n_full * SUB + tail_steps, seq, stride_vs, stride_vd,
                                     HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_SIZE, QK_INT8, PV_FP8, MAGIC_INT8, EXP,
                                     EXACT_FP8, TWO_LEVEL, True)
    # A query block with no kept key block has l_i = 0 and acc = 0: it writes zeros.
    inverse = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)
    if PV_FP8:  # V's channel scales come back here, once per output element
        v_scale = tl.load(VS + bh * HEAD_DIM + offs_d)
        out = acc * v_scale[None, :] * inverse[:, None]
    else:
        out = acc * inverse[:, None]
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od, out.to(O.dtype.element_ty),
             mask=offs_m[:, None] < seq)


# ----------------------------------------------------------------------------------------
# Host side


class Quantized(NamedTuple):
    """What the attention kernel reads. q, k: (B*H, S_pad, D) int8 / fp8 (zero rows past S);
    q_scale (B*H, S_q_pad // block_m) including softmax scale * log2(e); k_scale
    (B*H, S_kv_pad // block_n); v: (B*H, D, S_kv_pad) fp8 with v_scale (B*H, D), or the
    caller's (B, H, S, D) tensor for pv_format="bf16" (v_scale None)."""
    q: torch.Tensor
    q_scale: torch.Tensor
    k: torch.Tensor
    k_scale: torch.Tensor
    v: torch.Tensor
    v_scale: torch.Tensor | None
    shape: tuple  # (B, H, S_q, S_kv, D)
    block_m: int
    block_n: int
    qk_format: str
    pv_format: str


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _check(q, k, v, scale, qk_format, pv_format, kernel: bool = True) -> None:
    """Refuse what the kernel (``kernel``) or the reference cannot take."""
    if qk_format not in QK_FORMATS:
        raise ValueError(f"qk_format={qk_format!r}; expected one of {QK_FORMATS}")
    if pv_format not in PV_FORMATS:
        raise ValueError(f"pv_format={pv_format!r}; expected one of {PV_FORMATS}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-D (B, H, S, D) tensor, got {getattr(x, 'shape', type(x))}")
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3] or k.shape[2] == 0:
        raise ValueError(f"shapes do not fit (B, H, S_q, D), (B, H, S_kv, D) twice: q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    allowed = (torch.bfloat16, torch.float16) + ((torch.float32,) if _interpreting() or not kernel else ())
    if q.dtype not in allowed:
        raise ValueError(f"dtype {q.dtype} not supported; expected one of {allowed} (float32 only under "
                         "TRITON_INTERPRET=1)")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head dim D={q.shape[-1]} not supported; expected one of {HEAD_DIMS}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"tensors on different devices: q {q.device}, k {k.device}, v {v.device}")
    if kernel and not supported(q.device, qk_format=qk_format, pv_format=pv_format):
        raise ValueError(f"qk_format={qk_format!r}, pv_format={pv_format!r} need a CUDA device of capability "
                         f">= 8.9 for fp8, >= 8.0 for int8 with bf16 P V (or TRITON_INTERPRET=1); q is on {q.device}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale={scale!r} must be a positive finite number or None (D**-0.5)")
    if max(q.shape[2], k.shape[2]) * max(x.stride(2) for x in (q, k, v)) >= 2**31:
        raise ValueError(f"S={max(q.shape[2], k.shape[2])} with row strides {q.stride(2)}, {k.stride(2)}, "
                         f"{v.stride(2)} overflows the kernel's int32 in-head offsets")


def _device_context(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def _stats_chunks(seq: int, rows: int) -> tuple[int, int]:
    """(tokens per chunk, number of chunks) for _column_stats: at most 64 chunks, so the
    quantize kernels finish the reduction from one small tile."""
    chunk = max(rows, triton.next_power_of_2(-(-seq // 64)))
    return chunk, -(-seq // chunk)


def _column_parts(k: torch.Tensor, v: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """K's column sums and V's column abs maxima (v None: K's only), per chunk of tokens:
    (B*H, n_chunks, D) float32 each."""
    batch, heads, seq, head_dim = k.shape
    rows = 64
    chunk, n_chunks = _stats_chunks(seq, rows)
    k_parts = torch.empty(batch * heads, n_chunks, head_dim, dtype=torch.float32, device=k.device)
    v_parts = None if v is None else torch.empty_like(k_parts)
    _column_stats[(n_chunks, batch * heads)](
        k, k if v is None else v, k_parts, k_parts if v_parts is None else v_parts, seq, heads, *k.stride(),
        *(k if v is None else v).stride(), HEAD_DIM=head_dim, ROWS=rows, CHUNK=chunk, WITH_V=v is not None,
        num_warps=4)
    return k_parts, v_parts


def quantize_qkv(q, k, v, scale: float | None = None, *, qk_format: str = "int8", pv_format: str = "fp8",
                 block_m: int = 128, block_n: int = 128) -> Quantized:
    """The quantization half of sage_attention (smooth K, per-block Q / K scales, per-channel
    transposed fp8 V): 3 or 4 small kernel launches; K and V are read twice (column stats,
    then quantization), Q once."""
    _check(q, k, v, scale, qk_format, pv_format)
    KernelConfig(block_m=block_m, block_n=block_n)  # refuses tiles that are not powers of two >= 16
    batch, heads, seq_q, head_dim = q.shape
    seq_kv = k.shape[2]
    scale = head_dim**-0.5 if scale is None else float(scale)
    seq_q_pad, seq_kv_pad = _round_up(seq_q, block_m), _round_up(seq_kv, block_n)
    qk_dtype = torch.int8 if qk_format == "int8" else torch.float8_e4m3fn
    exact = _interpreting()
    bh = batch * heads
    common = dict(HEAD_DIM=head_dim, FP8=qk_format == "fp8", EXACT_FP8=exact, num_warps=4)
    with _device_context(q):
        q_q = torch.empty(bh, seq_q_pad, head_dim, dtype=qk_dtype, device=q.device)
        q_scale = torch.empty(bh, seq_q_pad // block_m, dtype=torch.float32, device=q.device)
        _quantize_rows[(seq_q_pad // block_m, bh)](q, q, q_q, q_scale, seq_q, seq_q_pad, heads, 1, scale * LOG2E,
                                                   *q.stride(), BLOCK=block_m, N_CHUNKS=1, SMOOTH=False, **common)
        k_parts, v_parts = _column_parts(k, None if pv_format == "bf16" else v)
        k_q = torch.empty(bh, seq_kv_pad, head_dim, dtype=qk_dtype, device=q.device)
        k_scale = torch.empty(bh, seq_kv_pad // block_n, dtype=torch.float32, device=q.device)
        _quantize_rows[(seq_kv_pad // block_n, bh)](k, k_parts, k_q, k_scale, seq_kv, seq_kv_pad, heads,
                                                    k_parts.shape[1], 1.0, *k.stride(), BLOCK=block_n,
                                                    N_CHUNKS=triton.next_power_of_2(k_parts.shape[1]),
                                                    SMOOTH=True, **common)
        if pv_format == "bf16":
            v_q, v_scale = v, None
        else:
            v_q = torch.empty(bh, head_dim, seq_kv_pad, dtype=torch.float8_e4m3fn, device=q.device)
            v_scale = torch.empty(bh, head_dim, dtype=torch.float32, device=q.device)
            _quantize_v_transposed[(seq_kv_pad // block_n, bh)](
                v, v_parts, v_q, v_scale, seq_kv, seq_kv_pad, heads, v_parts.shape[1], *v.stride(),
                HEAD_DIM=head_dim, BLOCK=block_n, N_CHUNKS=triton.next_power_of_2(v_parts.shape[1]),
                EXACT_FP8=exact, num_warps=4)
    return Quantized(q_q, q_scale, k_q, k_scale, v_q, v_scale, (batch, heads, seq_q, seq_kv, head_dim),
                     block_m, block_n, qk_format, pv_format)


def attend_quantized(quantized: Quantized, out: torch.Tensor, config: KernelConfig | None = None) -> torch.Tensor:
    """The attention half of sage_attention, into ``out`` (B, H, S_q, D), any strides."""
    batch, heads, seq_q, seq_kv, head_dim = quantized.shape
    if config is None:
        device = quantized.q.device
        config = dataclasses.replace(default_config(head_dim, device, quantized.qk_format, quantized.pv_format),
                                     block_m=quantized.block_m, block_n=quantized.block_n)
    if (config.block_m, config.block_n) != (quantized.block_m, quantized.block_n):
        raise ValueError(f"config tiles {config.block_m} x {config.block_n} differ from the quantization blocks "
                         f"{quantized.block_m} x {quantized.block_n}")
    if out.shape != (batch, heads, seq_q, head_dim):
        raise ValueError(f"out has shape {tuple(out.shape)}; expected {(batch, heads, seq_q, head_dim)}")
    seq_q_pad, seq_kv_pad = quantized.q.shape[1], quantized.k.shape[1]
    pv_fp8 = quantized.pv_format == "fp8"
    if pv_fp8:  # V^T (B*H, D, S_kv_pad)
        v_strides = (heads * head_dim * seq_kv_pad, head_dim * seq_kv_pad, 1, seq_kv_pad)
    else:
        v_strides = quantized.v.stride()
    exp = EXP_MODES.index(config.exp)
    if exp == 2 and not pv_fp8:  # f16x2 exp2 is meant for (and measured with) an fp8 P only
        exp = 1
    grid = (triton.cdiv(seq_q, config.block_m), batch * heads)
    v_scale = quantized.v_scale if pv_fp8 else quantized.q_scale  # unread when not pv_fp8
    with _device_context(out):
        _sage_fwd[grid](
            quantized.q, quantized.k, quantized.v, quantized.q_scale, quantized.k_scale, v_scale, out,
            seq_q, seq_kv, seq_q_pad, seq_kv_pad, heads, *v_strides, *out.stride(),
            HEAD_DIM=head_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            QK_INT8=quantized.qk_format == "int8", PV_FP8=pv_fp8, MAGIC_INT8=config.magic_int8, EXP=exp,
            EXACT_FP8=_interpreting(), TWO_LEVEL=config.two_level, PIPELINE=config.pipeline,
            WARP_SPECIALIZE=config.warp_specialize, HAS_TAIL=seq_kv % config.block_n != 0,
            num_warps=config.num_warps, num_stages=config.num_stages,
            **({} if config.maxnreg is None else {"maxnreg": config.maxnreg}))
    return out


def dequantize(quantized: Quantized) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_qkv's output back to float32 (B, H, S, D): q (times softmax scale * log2(e)),
    the smoothed k, and v; reference_quantize's counterpart, for tests."""
    batch, heads, seq_q, seq_kv, head_dim = quantized.shape

    def rows(values, scales, block, seq):
        scales = scales.repeat_interleave(block, dim=1)[:, :seq, None]
        return (values[:, :seq].float() * scales).view(batch, heads, seq, head_dim)

    q = rows(quantized.q, quantized.q_scale, quantized.block_m, seq_q)
    k = rows(quantized.k, quantized.k_scale, quantized.block_n, seq_kv)
    if quantized.pv_format == "fp8":
        v = (quantized.v[:, :, :seq_kv].float() * quantized.v_scale[:, :, None]).transpose(1, 2)
        v = v.reshape(batch, heads, seq_kv, head_dim)
    else:
        v = quantized.v.float()
    return q, k, v


def _launch(q, k, v, scale=None, *, qk_format="int8", pv_format="fp8", config=None, out=None):
    """sage_attention with a chosen KernelConfig and output buffer (tests, tuning)."""
    _check(q, k, v, scale, qk_format, pv_format)
    config = config or default_config(q.shape[-1], q.device, qk_format, pv_format)
    quantized = quantize_qkv(q, k, v, scale, qk_format=qk_format, pv_format=pv_format,
                             block_m=config.block_m, block_n=config.block_n)
    out = torch.empty_like(q) if out is None else out  # keeps q's strides, e.g. a (B, S, H, D) layout
    return attend_quantized(quantized, out, config)


def sage_attention(q, k, v, scale: float | None = None, *, qk_format: str = "int8",
                   pv_format: str = "fp8") -> torch.Tensor:
    """softmax(q k^T * scale) v with Q, K in int8 / fp8 and P V in fp8 / bf16, SageAttention
    style, quantization included. q: (B, H, S_q, D), k and v: (B, H, S_kv, D), one dtype
    (bf16 / fp16; float32 too under TRITON_INTERPRET=1), D in {64, 128}, any strides;
    scale defaults to D**-0.5. qk_format: "int8" | "fp8"; pv_format: "fp8" | "bf16" (P and V
    in the inputs' 16-bit dtype). Returns (B, H, S_q, D) in q's dtype, with q's strides."""
    return _launch(q, k, v, scale, qk_format=qk_format, pv_format=pv_format)


def _check_sparse(q, k, v, kv_num_blocks, kv_indices, block_size, scale, qk_format, pv_format,
                  kernel: bool = True) -> None:
    """Both kernels' contracts: the sage one on q, k, v and formats, the block-sparse one
    (self-attention, the block lists' shapes and dtype) on the blocks."""
    from cadence.accel.attention._triton import _check as _check_block_sparse

    _check(q, k, v, scale, qk_format, pv_format, kernel=kernel)
    if kernel:
        _check_block_sparse(q, k, v, kv_num_blocks, kv_indices, block_size)
    elif k.shape != q.shape:
        raise ValueError(f"q, k, v shapes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


def sparse_config(head_dim: int, block_size: int, device: torch.device, qk_format: str = "int8",
                  pv_format: str = "fp8") -> KernelConfig:
    """The dense kernel's tiles, each capped at the mask's block_size: a query tile lies in one
    query block and a key tile in one key block (both powers of two, so the caps divide)."""
    config = default_config(head_dim, device, qk_format, pv_format)
    return dataclasses.replace(config, block_m=min(config.block_m, block_size),
                               block_n=min(config.block_n, block_size))


def _sparse_launch(q, k, v, kv_num_blocks, kv_indices, block_size=128, scale=None, *, qk_format="int8",
                   pv_format="fp8", config=None, out=None):
    """sparse_sage_attention with a chosen KernelConfig and output buffer (tests, tuning)."""
    _check_sparse(q, k, v, kv_num_blocks, kv_indices, block_size, scale, qk_format, pv_format)
    batch, heads, seq, head_dim = q.shape
    config = config or sparse_config(head_dim, block_size, q.device, qk_format, pv_format)
    if block_size % config.block_m or block_size % config.block_n:
        raise ValueError(f"config tiles {config.block_m} x {config.block_n} must divide block_size={block_size}")
    quantized = quantize_qkv(q, k, v, scale, qk_format=qk_format, pv_format=pv_format,
                             block_m=config.block_m, block_n=config.block_n)
    out = torch.empty_like(q) if out is None else out  # keeps q's strides, e.g. a (B, S, H, D) layout
    blocks = triton.cdiv(seq, block_size)
    num = kv_num_blocks.expand(batch, heads, blocks)  # broadcast batch / head with stride 0
    idx = kv_indices.expand(batch, heads, blocks, blocks)
    seq_q_pad, seq_kv_pad = quantized.q.shape[1], quantized.k.shape[1]
    pv_fp8 = pv_format == "fp8"
    if pv_fp8:  # V^T (B*H, D, S_kv_pad)
        v_strides = (heads * head_dim * seq_kv_pad, head_dim * seq_kv_pad, 1, seq_kv_pad)
    else:
        v_strides = quantized.v.stride()
    exp = EXP_MODES.index(config.exp)
    if exp == 2 and not pv_fp8:  # f16x2 exp2 is meant for (and measured with) an fp8 P only
        exp = 1
    v_scale = quantized.v_scale if pv_fp8 else quantized.q_scale  # unread when not pv_fp8
    grid = (triton.cdiv(seq, config.block_m), batch * heads)
    with _device_context(out):
        _sparse_sage_fwd[grid](
            quantized.q, quantized.k, quantized.v, quantized.q_scale, quantized.k_scale, v_scale, out, num, idx,
            seq, seq_q_pad, seq_kv_pad, heads, blocks, *v_strides, *out.stride(), *num.stride(), *idx.stride(),
            HEAD_DIM=head_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_SIZE=block_size,
            QK_INT8=qk_format == "int8", PV_FP8=pv_fp8, MAGIC_INT8=config.magic_int8, EXP=exp,
            EXACT_FP8=_interpreting(), TWO_LEVEL=config.two_level, HAS_TAIL=seq % block_size != 0,
            num_warps=config.num_warps, num_stages=config.num_stages,
            **({} if config.maxnreg is None else {"maxnreg": config.maxnreg}))
    return out


def sparse_sage_attention(q, k, v, kv_num_blocks, kv_indices, block_size: int = 128, scale: float | None = None, *,
                          qk_format: str = "int8", pv_format: str = "fp8") -> torch.Tensor:
    """Block-sparse attention with sage_attention's numerics (SpargeAttn, Zhang et al. 2025,
    which runs its kept blocks on SageAttention's kernel): each query tile attends only its
    kept key blocks, with Q, K in int8 / fp8 and P V in fp8 / bf16, quantization included.
    q, k, v: (B, H, S, D) as sage_attention takes them (self-attention: one S).
    kv_num_blocks (B, H, num_q_blocks) and kv_indices (B, H, num_q_blocks, num_kv_blocks),
    int32, B and H may be 1: the kept key blocks of each block_size x block_size query block,
    ascending and first, as _triton.block_sparse_attention and FlexAttention's BlockMask take
    them (values unchecked on the device). The kernel's tiles are sage_attention's, capped at
    block_size (sparse_config): the Q / K scale blocks are then the tiles, never wider than a
    mask block. K is smoothed by its mean over all S keys, kept or not: softmax ignores the
    per-query shift either way. Returns (B, H, S, D) in q's dtype, with q's strides; a query
    block with no kept key block returns zeros.

    Where it differs from SpargeAttn: the mask is given, not predicted inside the call (the
    patterns of cadence.accel.attention build it), and there is no in-kernel skipping of
    blocks whose P is negligible (SpargeAttn's second stage): the kept set is exactly the mask,
    so the block-sparse reference bounds it."""
    return _sparse_launch(q, k, v, kv_num_blocks, kv_indices, block_size, scale, qk_format=qk_format,
                          pv_format=pv_format)


# ----------------------------------------------------------------------------------------
# Reference


def _reference_rows(x: torch.Tensor, block: int, fmt: str, scale_mult: float = 1.0):
    """x (B, H, S, D) float32 -> (quantized values as float32 (B, H, S, D), per-row scale
    (B, H, S, 1)), block by block as _quantize_rows does."""
    batch, heads, seq, head_dim = x.shape
    pad = _round_up(seq, block) - seq
    blocks = torch.nn.functional.pad(x, (0, 0, 0, pad)).view(batch, heads, -1, block, head_dim)
    amax = blocks.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(AMAX_FLOOR)
    if fmt == "int8":
        values = torch.round((blocks * (INT8_MAX / amax)).clamp(-INT8_MAX, INT8_MAX))
        scale = amax / INT8_MAX
    else:
        values = (blocks * (FP8_MAX / amax)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
        scale = amax / FP8_MAX
    values = values.view(batch, heads, -1, head_dim)[:, :, :seq]
    scale = (scale * scale_mult).expand(-1, -1, -1, block, 1).reshape(batch, heads, -1, 1)[:, :, :seq]
    return values, scale


def reference_quantize(q, k, v, scale=None, *, qk_format="int8", pv_format="fp8", block_m=128, block_n=128):
    """Plain PyTorch: the dequantized q (times softmax scale * log2(e)), smoothed k and v
    (float32, (B, H, S, D)) that the kernel computes with."""
    head_dim = q.shape[-1]
    scale = head_dim**-0.5 if scale is None else float(scale)
    q_values, q_scale = _reference_rows(q.float(), block_m, qk_format, scale * LOG2E)
    kf = k.float()
    k_values, k_scale = _reference_rows(kf - kf.mean(dim=2, keepdim=True), block_n, qk_format)
    if pv_format == "fp8":
        v_amax = v.float().abs().amax(dim=2, keepdim=True).clamp_min(AMAX_FLOOR)  # (B, H, 1, D)
        v_values = (v.float() * (FP8_MAX / v_amax)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
        v_deq = v_values * (v_amax / FP8_MAX)
    else:
        v_deq = v.float()
    return q_values * q_scale, k_values * k_scale, v_deq


def reference_sage_attention(q, k, v, scale: float | None = None, *, qk_format: str = "int8",
                             pv_format: str = "fp8", block_m: int | None = None,
                             block_n: int | None = None) -> torch.Tensor:
    """Plain PyTorch, float32: the same quantization of q, k, v (same blocks and scales,
    quantize-dequantize) and of P (P * 448 to fp8, or P in v's dtype), then softmax
    attention. One difference stays: the kernel quantizes P against the running row max
    of the online softmax, this against the final one (same fp8 grid, scaled by a power
    of exp2 of the max's growth), so the two agree to fp8 rounding of P, not bitwise.
    block_m / block_n default to the kernel's default config on q's device (give them off it)."""
    _check(q, k, v, scale, qk_format, pv_format, kernel=block_m is None or block_n is None)
    if block_m is None or block_n is None:
        config = default_config(q.shape[-1], q.device, qk_format, pv_format)
        block_m, block_n = block_m or config.block_m, block_n or config.block_n
    quantized = reference_quantize(q, k, v, scale, qk_format=qk_format, pv_format=pv_format,
                                   block_m=block_m, block_n=block_n)
    return _reference_attend(*quantized, None, pv_format, v.dtype).to(q.dtype)


def _reference_attend(q_deq, k_deq, v_deq, keep: torch.Tensor | None, pv_format: str, v_dtype) -> torch.Tensor:
    """Softmax attention on reference_quantize's output, P quantized as the kernel does;
    keep: (B or 1, H or 1, S_q, S_kv) bool, the logits attended (None: all). A row that
    keeps nothing gives zeros, as the sparse kernel writes. Float32 (B, H, S_q, D)."""
    logits = q_deq @ k_deq.transpose(-1, -2)  # (B, H, S_q, S_kv), log2 units
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    row_max = logits.amax(dim=-1, keepdim=True)
    logits = logits - torch.where(torch.isfinite(row_max), row_max, 0.0)
    if pv_format == "fp8":
        p = torch.exp2(logits + P_LOG2_SCALE)
        p_used = p.clamp(max=FP8_MAX).to(torch.float8_e4m3fn).float()
    else:
        p = torch.exp2(logits)
        p_used = p.to(v_dtype).float()
    total = p.sum(dim=-1, keepdim=True)
    return (p_used @ v_deq) / torch.where(total == 0, 1.0, total)


def reference_sparse_sage_attention(q, k, v, kv_num_blocks, kv_indices, block_size: int = 128,
                                    scale: float | None = None, *, qk_format: str = "int8", pv_format: str = "fp8",
                                    block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """Plain PyTorch, float32: reference_sage_attention's quantization (blocks of block_m
    query rows and block_n key rows, K smoothed over all keys) with the block mask of
    (kv_num_blocks, kv_indices) applied to the logits; query rows that keep no key are zeros.
    Like the dense reference, it rounds P against the final row max over the kept keys.
    block_m / block_n default to sparse_config's tiles on q's device (give them off it)."""
    from cadence.accel.attention._triton import kv_blocks_to_dense

    _check_sparse(q, k, v, kv_num_blocks, kv_indices, block_size, scale, qk_format, pv_format,
                  kernel=block_m is None or block_n is None)
    if block_m is None or block_n is None:
        config = sparse_config(q.shape[-1], block_size, q.device, qk_format, pv_format)
        block_m, block_n = block_m or config.block_m, block_n or config.block_n
    seq = q.shape[2]
    kept = kv_blocks_to_dense(kv_num_blocks, kv_indices)  # (B or 1, H or 1, blocks, blocks)
    keep = kept.repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)[..., :seq, :seq]
    quantized = reference_quantize(q, k, v, scale, qk_format=qk_format, pv_format=pv_format,
                                   block_m=block_m, block_n=block_n)
    return _reference_attend(*quantized, keep, pv_format, v.dtype).to(q.dtype)
