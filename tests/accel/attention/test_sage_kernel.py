"""The SageAttention-style Triton kernel (int8 / fp8 QK, fp8 / 16-bit PV) against its plain
PyTorch reference, run by Triton's interpreter on the CPU at tiny sizes (conftest sets
TRITON_INTERPRET=1 before triton is first imported). The interpreter runs int8 and fp8
tl.dot exactly; its fp32 -> fp8 cast rounds wrongly, which the kernel sidesteps under the
interpreter by snapping onto the fp8 grid first (see _to_e4m3); its bf16 tl.dot is wrong
(triton 3.9), so the 16-bit P V path is tested with fp16 and float32 inputs, and bf16
inputs are left to the GPU benchmark (benchmarks/quant_attention.py)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from cadence.accel.attention._sage_triton import (  # noqa: E402
    KernelConfig,
    _launch,
    dequantize,
    quantize_qkv,
    reference_quantize,
    reference_sage_attention,
    sage_attention,
    supported,
)

FORMATS = [("int8", "fp8"), ("int8", "bf16"), ("fp8", "fp8"), ("fp8", "bf16")]
TILES = KernelConfig(block_m=32, block_n=16, num_warps=4, num_stages=1, exp="libdevice")  # the interpreter default


def inputs(batch, heads, seq, dim, seed, dtype=torch.float32, seq_kv=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq, dim, generator=g)
    k, v = (torch.randn(batch, heads, seq_kv or seq, dim, generator=g) for _ in range(2))
    return q.to(dtype), k.to(dtype), v.to(dtype)


def relative_error(out, expected):
    out, expected = out.float(), expected.float()
    return ((out - expected).norm() / expected.norm()).item()


def cosine(out, expected):
    return F.cosine_similarity(out.float().flatten(), expected.float().flatten(), dim=0).item()


def run(q, k, v, qk_format, pv_format, scale=None, config=TILES):
    """The kernel into a NaN-filled buffer with rows after S: every element must be
    written, and nothing past S."""
    batch, heads, seq, dim = q.shape
    buffer = torch.full((batch, heads, seq + 8, dim), float("nan"), dtype=q.dtype)
    out = _launch(q, k, v, scale, qk_format=qk_format, pv_format=pv_format, config=config, out=buffer[:, :, :seq])
    assert torch.isnan(buffer[:, :, seq:]).all(), "wrote past S"
    assert not torch.isnan(out).any(), "left elements unwritten"
    return out


@pytest.mark.parametrize("qk_format, pv_format", FORMATS)
def test_quantization_matches_reference(qk_format, pv_format):
    """Same block scales and values as the reference; k differs only by the rounding of its
    mean (summed in another order), which may flip a rare value by one step."""
    q, k, v = inputs(2, 2, 72, 64, seed=1)
    k = k + 3.0 * torch.randn(64, generator=torch.Generator().manual_seed(2))  # channel outliers
    quantized = quantize_qkv(q, k, v, qk_format=qk_format, pv_format=pv_format, block_m=32, block_n=16)
    mine = dequantize(quantized)
    expected = reference_quantize(q, k, v, qk_format=qk_format, pv_format=pv_format, block_m=32, block_n=16)
    assert torch.equal(mine[0], expected[0])
    assert torch.equal(mine[2], expected[2])
    step = expected[1].abs().amax() / (127 if qk_format == "int8" else 16)
    flipped = (mine[1] - expected[1]).abs() > 1e-4 * step
    assert flipped.float().mean() < 0.01 and (mine[1] - expected[1]).abs().max() <= step
    # The kernel reads these pads unmasked: they must be zeros, not garbage.
    assert (quantized.q[:, 72:].float() == 0).all() and (quantized.k[:, 72:].float() == 0).all()
    if pv_format == "fp8":
        assert (quantized.v[:, :, 72:].float() == 0).all()


@pytest.mark.parametrize("qk_format, pv_format", FORMATS)
def test_matches_reference_when_first_key_block_holds_the_max(qk_format, pv_format):
    """When the online softmax's running max is final from the first key block on, the
    kernel quantizes P on the reference's grid: they agree to float32 rounding (measured
    1.2e-6 to 1.4e-6 in every format). B = 2, S = 72 = 4 * 16 + 8: a short last key block and a short last
    query tile."""
    q, k, v = inputs(2, 2, 72, 64, seed=3)
    direction = torch.randn(64, generator=torch.Generator().manual_seed(4))
    q = q + direction
    k[:, :, :16] += 2.0 * direction  # keys 0-15 score highest for every query
    out = run(q, k, v, qk_format, pv_format)
    expected = reference_sage_attention(q, k, v, qk_format=qk_format, pv_format=pv_format, block_m=32, block_n=16)
    assert relative_error(out, expected) < 1e-4


@pytest.mark.parametrize(
    "qk_format, pv_format, batch, seq, seq_kv, dim, dtype, limit",
    [
        ("int8", "fp8", 2, 72, None, 64, torch.float32, 0.03),
        ("int8", "bf16", 1, 40, 88, 64, torch.float16, 2e-3),  # cross attention, fp16 P V
        ("fp8", "fp8", 1, 48, 56, 128, torch.float16, 0.03),
        ("fp8", "bf16", 2, 33, None, 64, torch.float32, 1e-5),
    ],
)
def test_matches_reference_on_random_inputs(qk_format, pv_format, batch, seq, seq_kv, dim, dtype, limit):
    """Random inputs: with an fp8 P the kernel rounds P against the running max, the
    reference against the final one, two fp8 grids: a few percent apart at most."""
    q, k, v = inputs(batch, 2, seq, dim, seed=seq + dim, dtype=dtype, seq_kv=seq_kv)
    out = run(q, k, v, qk_format, pv_format)
    expected = reference_sage_attention(q, k, v, qk_format=qk_format, pv_format=pv_format, block_m=32, block_n=16)
    assert relative_error(out, expected) < limit
    assert out.shape == q.shape and out.dtype == q.dtype


@pytest.mark.parametrize(
    "qk_format, pv_format, max_error",
    [("int8", "fp8", 0.06), ("int8", "bf16", 0.02), ("fp8", "fp8", 0.08), ("fp8", "bf16", 0.06)],
)
def test_reference_is_close_to_exact_attention(qk_format, pv_format, max_error):
    """The quantization costs a bounded error: relative L2 vs float32 SDPA on random
    inputs (measured 0.036, 0.011, 0.052, 0.039 here; cosine 0.99935 to 0.9986)."""
    q, k, v = inputs(2, 3, 200, 64, seed=5)
    expected = F.scaled_dot_product_attention(q, k, v)
    out = reference_sage_attention(q, k, v, qk_format=qk_format, pv_format=pv_format, block_m=32, block_n=16)
    assert relative_error(out, expected) < max_error
    assert cosine(out, expected) > 0.997


@pytest.mark.parametrize(
    "option, limit",
    [
        (dict(pipeline=True), 1e-6),  # the same arithmetic in another order of issue
        (dict(two_level=False), 1e-6),  # exact here; on Hopper the MMA's accumulator is coarser
        (dict(magic_int8=True), 2e-3),  # MAGIC's rounding may flip a rare fp8 P
    ],
)
def test_kernel_options_compute_the_same_function(option, limit):
    q, k, v = inputs(1, 2, 72, 64, seed=9)
    for qk_format in ("int8", "fp8"):
        base = run(q, k, v, qk_format, "fp8")
        other = run(q, k, v, qk_format, "fp8", config=dataclasses.replace(TILES, **option))
        assert relative_error(other, base) < limit


def test_adding_one_vector_to_every_key_changes_nothing():
    """Smoothing K: softmax ignores a per-row constant, and K's mean absorbs the shift, so a
    large channel bias (the outliers that wreck a plain int8 K) leaves the output as is."""
    q, k, v = inputs(1, 2, 64, 64, seed=6)
    bias = 20.0 * torch.randn(64, generator=torch.Generator().manual_seed(7))
    plain = run(q, k, v, "int8", "bf16")
    shifted = run(q, k + bias, v, "int8", "bf16")
    assert relative_error(shifted, plain) < 1e-3


def test_views_of_bshd_tensors_and_explicit_scale():
    """(B, S, H, D) tensors permuted to (B, H, S, D), as attention processors hold them: the
    output keeps that layout."""
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in inputs(2, 2, 40, 64, seed=8))
    assert not q.is_contiguous()
    out = sage_attention(q, k, v, 0.3, qk_format="int8", pv_format="fp8")
    assert out.stride() == q.stride()
    expected = reference_sage_attention(q, k, v, 0.3, qk_format="int8", pv_format="fp8")
    assert relative_error(out, expected) < 0.03


def test_supported_under_the_interpreter():
    assert supported("cpu") and supported("cpu", qk_format="fp8", pv_format="bf16")
    assert not supported("meta")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(qk_format="int4"), r"qk_format='int4'; expected one of \('int8', 'fp8'\)"),
        (dict(pv_format="fp16"), r"pv_format='fp16'; expected one of \('fp8', 'bf16'\)"),
        (dict(scale=-1.0), r"scale=-1.0 must be a positive"),
        (dict(q=torch.zeros(2, 40, 64)), r"q must be a 4-D"),
        (dict(k=torch.zeros(1, 2, 40, 32), v=torch.zeros(1, 2, 40, 32)), r"shapes do not fit"),
        (dict(q=torch.zeros(1, 2, 40, 48), k=torch.zeros(1, 2, 40, 48), v=torch.zeros(1, 2, 40, 48)), r"D=48"),
        (dict(v=torch.zeros(1, 2, 40, 64, dtype=torch.float64)), r"dtypes differ"),
        (dict(q=torch.zeros(1, 2, 40, 64, dtype=torch.float64), k=torch.zeros(1, 2, 40, 64, dtype=torch.float64),
              v=torch.zeros(1, 2, 40, 64, dtype=torch.float64)), r"torch.float64 not supported"),
    ],
)
def test_bad_arguments_refused(change, message):
    q, k, v = inputs(1, 2, 40, 64, seed=0)
    args = dict(q=q, k=k, v=v, scale=None, qk_format="int8", pv_format="fp8") | change
    with pytest.raises(ValueError, match=message):
        sage_attention(**args)


def test_config_refuses_bad_tiles():
    with pytest.raises(ValueError, match=r"block_m=24 must be a power of two"):
        KernelConfig(block_m=24)
    with pytest.raises(ValueError, match=r"exp='fast'; expected one of"):
        KernelConfig(exp="fast")
