"""The block-sparse kernels against plain masked-dense attention on fresh random inputs."""

import pytest
import torch
import torch.nn.functional as F

from cadence.accel.attention import kernels
from cadence.accel.attention.block_mask import BlockSparse
from cadence.accel.attention.kernels import attend

TOLERANCE = dict(rtol=1e-5, atol=1e-5)  # float32, same maths in another order
# Triton runs in its interpreter on the CPU (conftest sets TRITON_INTERPRET=1).
BACKENDS = ["reference", "flex"] + (["triton"] if kernels.triton_available() else [])


def _inputs(seed, batch=2, heads=3, tokens=80, dim=16):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, tokens, dim, generator=generator) for _ in range(3)]


def _random_mask(seed, batch, heads, blocks, density=0.4):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, heads, blocks, blocks, generator=generator) < density
    return mask | torch.eye(blocks, dtype=torch.bool)


def _masked_dense(query, key, value, mask, block, key_valid=None):
    """Attention written out: softmax over the kept keys of each row."""
    tokens = query.shape[-2]
    keep = mask.repeat_interleave(block, -1).repeat_interleave(block, -2)[..., :tokens, :tokens]
    if key_valid is not None:
        keep = keep & key_valid[:, None, None, :]
    scores = (query @ key.transpose(-1, -2)) * query.shape[-1] ** -0.5
    return torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1) @ value


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens", [64, 80])  # 80: the last block is short
def test_block_sparse_equals_masked_dense(backend, tokens):
    query, key, value = _inputs(seed=tokens, tokens=tokens)
    mask = _random_mask(seed=1, batch=2, heads=3, blocks=-(-tokens // 16))
    output = attend(query, key, value, BlockSparse(mask, 16, tokens), backend=backend)
    torch.testing.assert_close(output, _masked_dense(query, key, value, mask, 16), **TOLERANCE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_mask_broadcasts_over_batch_and_heads(backend):
    query, key, value = _inputs(seed=2)
    mask = _random_mask(seed=3, batch=1, heads=1, blocks=5)
    output = attend(query, key, value, BlockSparse(mask, 16, 80), backend=backend)
    torch.testing.assert_close(output, _masked_dense(query, key, value, mask.expand(2, 3, 5, 5), 16), **TOLERANCE)


@pytest.mark.parametrize("backend", ["reference", "flex"])
def test_key_padding_mask(backend):
    query, key, value = _inputs(seed=4)
    mask = _random_mask(seed=5, batch=2, heads=3, blocks=5)
    mask[..., :, 4] = True  # the padded keys' block is kept: the padding mask must hide them
    key_valid = torch.ones(2, 80, dtype=torch.bool)
    key_valid[0, 70:] = False
    output = attend(query, key, value, BlockSparse(mask, 16, 80), key_valid=key_valid, backend=backend)
    torch.testing.assert_close(output, _masked_dense(query, key, value, mask, 16, key_valid), **TOLERANCE)


def test_full_mask_equals_dense_attention():
    query, key, value = _inputs(seed=6)
    full = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    output = attend(query, key, value, BlockSparse(full, 16, 80), backend="reference")
    torch.testing.assert_close(output, F.scaled_dot_product_attention(query, key, value), **TOLERANCE)


def test_error_is_bounded_by_the_dropped_attention_mass():
    """Dropping keys that hold a share (1 - m) of a row's attention moves that row's output
    by at most 2 (1 - m) max|v|: the bound every sparse pattern promises per call."""
    query, key, value = _inputs(seed=7, tokens=96)
    mask = _random_mask(seed=8, batch=2, heads=3, blocks=6, density=0.3)
    sparse = BlockSparse(mask, 16, 96)
    output = attend(query, key, value, sparse, backend="reference")
    dense_output = F.scaled_dot_product_attention(query, key, value)
    probability = torch.softmax(query @ key.transpose(-1, -2) * 16 ** -0.5, dim=-1)
    kept_mass = (probability * sparse.token_mask(None)).sum(-1)  # (B, H, tokens)
    error = (output - dense_output).abs().amax(-1)
    bound = 2 * (1 - kept_mass) * value.abs().amax(dim=(-2, -1), keepdim=True)[..., 0]
    assert (error <= bound + 1e-5).all()
    assert (error > 0).any()


def test_kv_blocks_list_the_kept_blocks_first_in_order():
    mask = _random_mask(seed=9, batch=1, heads=2, blocks=6)
    count, indices = BlockSparse(mask, 16, 96).kv_blocks(1, 2)
    for head in range(2):
        for row in range(6):
            kept = indices[0, head, row, : count[0, head, row]].tolist()
            assert kept == mask[0, head, row].nonzero().flatten().tolist()


def test_triton_refuses_a_key_padding_mask():
    query, key, value = _inputs(seed=11)
    sparse = BlockSparse(torch.ones(1, 1, 5, 5, dtype=torch.bool), 16, 80)
    with pytest.raises(ValueError, match="takes no key padding mask; use backend='flex'"):
        attend(query, key, value, sparse, key_valid=torch.ones(2, 80, dtype=torch.bool), backend="triton")


def test_unknown_backend_is_refused():
    query, key, value = _inputs(seed=10)
    with pytest.raises(ValueError, match="unknown attention backend 'cuda'.*valid: auto, reference, flex, triton"):
        attend(query, key, value, BlockSparse(torch.ones(1, 1, 5, 5, dtype=torch.bool), 16, 80), backend="cuda")


def test_auto_backend_is_the_reference_on_the_cpu_and_for_float32():
    assert kernels.resolve_backend("auto", torch.zeros(1), None) == "reference"
    assert kernels.resolve_backend("auto", torch.zeros(1, dtype=torch.bfloat16), None) == "reference"
    assert kernels.resolve_backend("flex", torch.zeros(1), None) == "flex"
