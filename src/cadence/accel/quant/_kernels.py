"""Activation quantization in one pass, in Triton: per row of x (tokens), divide by the
SmoothQuant factors, take the absolute maximum, scale and cast to FP8 e4m3 or INT8.

Eager PyTorch makes five passes over x for the same (abs, amax, divide, clamp, cast); at
Wan2.1-1.3B size a linear's input is 32,760 x 1,536 bf16 (100 MB), and there are ~180 such
inputs a forward. This kernel makes one read and one write, the floor without fusing into
the op that produces x: measured 0.1 ms on a 1,536-wide and 0.37 ms on an 8,960-wide input on an H100
(benchmarks/RESULTS.md, "Quantization"): a fifth to all of what the FP8 GEMM saves.

The row maximum is also written out, so a NaN or Inf in x is seen without another pass.
This module imports triton: import it only where triton is installed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cadence.accel.quant.formats._base import TINY


@triton.jit
def _quantize_rows(x_ptr, inv_smooth_ptr, out_ptr, scale_ptr, amax_ptr, static_scale_ptr, flag_ptr, rows, cols,
                   stride_x, stride_out, QMAX: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                   SMOOTH: tl.constexpr, STATIC: tl.constexpr, TO_INT: tl.constexpr, FLOOR: tl.constexpr,
                   FLAG: tl.constexpr):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    offsets = tl.arange(0, BLOCK)
    in_row = row < rows
    mask = in_row[:, None] & (offsets < cols)[None, :]
    x = tl.load(x_ptr + row[:, None] * stride_x + offsets[None, :], mask=mask, other=0.0).to(tl.float32)
    if SMOOTH:
        x = x * tl.load(inv_smooth_ptr + offsets, mask=offsets < cols, other=0.0)[None, :]
    amax = tl.max(tl.abs(x), axis=1)  # (ROWS,)
    tl.store(amax_ptr + row, amax, mask=in_row)
    if FLAG:  # NaN or Inf in a row: clear the layer's flag, no extra kernel
        bad = (amax != amax) | (amax == float("inf"))
        tl.store(flag_ptr + row * 0, tl.zeros_like(row).to(tl.uint8), mask=bad & in_row)
    if STATIC:
        scale = tl.load(static_scale_ptr + row * 0)
    else:
        scale = tl.maximum(amax, FLOOR) / QMAX
        tl.store(scale_ptr + row, scale, mask=in_row)
    q = tl.minimum(tl.maximum(x / scale[:, None], -QMAX), QMAX)
    if TO_INT:
        q = tl.where(q >= 0, tl.floor(q + 0.5), tl.ceil(q - 0.5))  # nearest, ties away from zero
    tl.store(out_ptr + row[:, None] * stride_out + offsets[None, :], q.to(out_ptr.dtype.element_ty), mask=mask)


def quantize_rows(x: torch.Tensor, dtype: torch.dtype, qmax: float, inv_smooth: torch.Tensor | None = None,
                  static_scale: torch.Tensor | None = None, flag: torch.Tensor | None = None):
    """x (M, K) -> (q (M, K) in ``dtype`` (FP8 e4m3 or INT8; integers round to nearest),
    scale (M, 1) fp32, row absmax (M,) fp32), symmetric in [-qmax, qmax]. ``flag`` (a
    one-element uint8 view) is set to 0 when a row holds NaN or Inf."""
    rows, cols = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((rows, cols), device=x.device, dtype=dtype)
    scale = torch.empty((rows, 1), device=x.device, dtype=torch.float32)
    amax = torch.empty((rows,), device=x.device, dtype=torch.float32)
    to_int = not dtype.is_floating_point
    block = triton.next_power_of_2(cols)
    per_program = max(1, 4096 // block)  # short rows: several a program, so each moves >= 8 KB
    _quantize_rows[(triton.cdiv(rows, per_program),)](
        x, inv_smooth if inv_smooth is not None else x, out, scale, amax,
        static_scale if static_scale is not None else scale, flag if flag is not None else amax, rows, cols,
        x.stride(0), out.stride(0), QMAX=qmax, BLOCK=block, ROWS=per_program, SMOOTH=inv_smooth is not None,
        STATIC=static_scale is not None, TO_INT=to_int, FLOOR=TINY, FLAG=flag is not None,
        num_warps=min(16, max(4, block * per_program // 512)),
    )
    if static_scale is not None:
        scale = static_scale.reshape(1, 1).expand(rows, 1)
    return out, scale, amax


@triton.jit
def _dequantize_int32(acc_ptr, row_scale_ptr, col_scale_ptr, bias_ptr, out_ptr, rows, cols,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BIAS: tl.constexpr, ROW_STRIDE: tl.constexpr):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (m < rows)[:, None] & (n < cols)[None, :]
    acc = tl.load(acc_ptr + m[:, None] * cols + n[None, :], mask=mask, other=0).to(tl.float32)
    y = acc * tl.load(row_scale_ptr + m * ROW_STRIDE, mask=m < rows, other=0.0)[:, None]
    y = y * tl.load(col_scale_ptr + n, mask=n < cols, other=0.0)[None, :]
    if BIAS:
        y = y + tl.load(bias_ptr + n, mask=n < cols, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + m[:, None] * cols + n[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_int32(acc: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
                     bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """INT8 GEMM epilogue in one pass: acc (M, N) int32 * row scale (M, 1) * column scale
    (1, N) + bias -> dtype. Eager PyTorch takes three passes over an fp32 (M, N) temporary
    (1.2 GB at 32,760 x 8,960): slower than the INT8 GEMM it follows."""
    rows, cols = acc.shape
    out = torch.empty((rows, cols), device=acc.device, dtype=dtype)
    block_m, block_n = 32, 128
    _dequantize_int32[(triton.cdiv(rows, block_m), triton.cdiv(cols, block_n))](
        acc, row_scale, col_scale, bias if bias is not None else col_scale, out, rows, cols,
        BLOCK_M=block_m, BLOCK_N=block_n, BIAS=bias is not None, ROW_STRIDE=row_scale.stride(0), num_warps=4)
    return out
