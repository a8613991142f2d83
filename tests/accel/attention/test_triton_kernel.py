"""The Triton block-sparse attention kernel against the plain PyTorch reference, run by
Triton's interpreter on the CPU (tiny sizes: the interpreter is slow). bf16 is left to the
GPU benchmark: the interpreter's tl.dot gets bf16 wrong (triton 3.9). conftest sets
TRITON_INTERPRET=1 before triton is first imported."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from cadence.accel.attention._triton import (
    KernelConfig,
    _launch,
    block_sparse_attention,
    kv_blocks_to_dense,
    reference_block_sparse_attention,
)
from cadence.accel.attention.block_mask import kv_blocks as dense_to_kv_blocks

FP32 = dict(atol=1e-4, rtol=1e-4)
FP16 = dict(atol=2e-3, rtol=2e-3)
POINTERS = KernelConfig(block_m=32, block_n=16, tma=False)
TMA = KernelConfig(block_m=16, block_n=16, tma=True)  # the descriptor path, as on Hopper


def inputs(batch, heads, seq, dim, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, seq, dim, generator=g).to(dtype) for _ in range(3)]


def random_blocks(batch, heads, seq, block, density, seed):
    """(B, H, nq, nk) bool: each key block kept with probability ``density``, diagonal kept."""
    blocks = -(-seq // block)
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, heads, blocks, blocks, generator=g) < density
    return mask | torch.eye(blocks, dtype=torch.bool)


def run(q, k, v, mask, block, config=None):
    """The kernel into a NaN-filled buffer with padding rows after S: every element must be
    written, and nothing past S."""
    num, idx = dense_to_kv_blocks(mask)
    batch, heads, seq, dim = q.shape
    buffer = torch.full((batch, heads, seq + 8, dim), float("nan"), dtype=q.dtype)
    out = _launch(q, k, v, num, idx, block, config=config, out=buffer[:, :, :seq])
    assert torch.isnan(buffer[:, :, seq:]).all(), "wrote past S"
    assert not torch.isnan(out).any(), "left elements unwritten"
    return out, reference_block_sparse_attention(q, k, v, num, idx, block)


@pytest.mark.parametrize(
    "batch, seq, dim, block, config",
    [
        (1, 64, 16, 16, None),
        (2, 88, 32, 32, POINTERS),  # tail: 88 = 2 * 32 + 24, its second key step half padding
        (1, 96, 16, 32, TMA),
        (2, 72, 16, 32, TMA),  # tail of 8 through TMA's zero fill
    ],
)
def test_matches_reference(batch, seq, dim, block, config):
    q, k, v = inputs(batch, 2, seq, dim, seed=seq + dim)
    mask = random_blocks(batch, 2, seq, block, 0.5, seed=block)
    out, expected = run(q, k, v, mask, block, config)
    torch.testing.assert_close(out, expected, **FP32)


def test_fp16():
    q, k, v = inputs(1, 2, 88, 32, seed=3, dtype=torch.float16)
    out, expected = run(q, k, v, random_blocks(1, 2, 88, 32, 0.5, seed=4), 32, POINTERS)
    torch.testing.assert_close(out, expected, **FP16)


def test_density_one_is_dense_attention():
    q, k, v = inputs(1, 2, 72, 32, seed=5)
    mask = torch.ones(1, 2, 3, 3, dtype=torch.bool)
    out, _ = run(q, k, v, mask, 32)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), **FP32)


def test_query_block_without_keys_gives_zeros():
    q, k, v = inputs(1, 2, 96, 16, seed=6)
    mask = random_blocks(1, 2, 96, 32, 0.5, seed=7)
    mask[0, 1, 1] = False  # head 1, query block 1 keeps nothing
    out, expected = run(q, k, v, mask, 32)
    assert (out[0, 1, 32:64] == 0).all()
    torch.testing.assert_close(out, expected, **FP32)


def test_permuted_inputs_and_explicit_scale():
    """Views of (B, S, H, D) tensors, as attention processors hold them; the output keeps
    that layout."""
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in inputs(2, 2, 88, 16, seed=8))
    assert not q.is_contiguous()
    num, idx = dense_to_kv_blocks(random_blocks(2, 2, 88, 32, 0.5, seed=9))
    for config in (POINTERS, TMA):
        out = _launch(q, k, v, num, idx, 32, scale=0.3, config=config)
        assert out.stride() == q.stride()
        torch.testing.assert_close(out, reference_block_sparse_attention(q, k, v, num, idx, 32, scale=0.3), **FP32)


def test_broadcast_mask_over_batch_and_heads():
    q, k, v = inputs(2, 2, 64, 16, seed=10)
    num, idx = dense_to_kv_blocks(random_blocks(1, 1, 64, 16, 0.5, seed=11))
    out = block_sparse_attention(q, k, v, num, idx, 16)
    torch.testing.assert_close(out, reference_block_sparse_attention(q, k, v, num, idx, 16), **FP32)


def test_mask_round_trip():
    mask = random_blocks(2, 3, 300, 32, 0.3, seed=12)
    num, idx = dense_to_kv_blocks(mask)
    assert num.dtype == idx.dtype == torch.int32
    kept = torch.arange(mask.shape[-1]) < num[..., None]
    assert (idx.diff(dim=-1)[kept[..., 1:]] > 0).all(), "kept indices ascend"
    assert torch.equal(kv_blocks_to_dense(num, idx), mask)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "k": a["k"][:, :, :48]}, r"k \(1, 2, 48, 16\)"),
        (lambda a: {**a, "q": a["q"][0]}, r"q must be a 4-D"),
        (lambda a: {**a, **dict(zip("qkv", inputs(1, 2, 64, 48, seed=0)))}, r"D=48"),
        (lambda a: {**a, "v": a["v"].double()}, r"torch.float64"),
        (lambda a: {**a, "kv_indices": a["kv_indices"][..., :3]}, r"kv_indices has shape \(1, 2, 4, 3\)"),
        (lambda a: {**a, "kv_num_blocks": a["kv_num_blocks"].long()}, r"kv_num_blocks must be int32, got torch.int64"),
        (lambda a: {**a, "block_size": 24}, r"block_size=24"),
    ],
)
def test_bad_inputs_refused(change, message):
    q, k, v = inputs(1, 2, 64, 16, seed=0)
    num, idx = dense_to_kv_blocks(random_blocks(1, 2, 64, 16, 0.5, seed=0))
    args = dict(q=q, k=k, v=v, kv_num_blocks=num, kv_indices=idx, block_size=16)
    with pytest.raises(ValueError, match=message):
        block_sparse_attention(**change(args))
