"""Sparse x low-bit attention: the block-sparse SageAttention kernel against its plain PyTorch
reference (Triton's interpreter on the CPU at tiny sizes; conftest sets TRITON_INTERPRET=1
before triton is first imported), and a sparse pattern with ``precision`` on a tiny
reference pipeline. bf16 inputs are left to the GPU (the interpreter's bf16 tl.dot is wrong,
triton 3.9): the kernel is tested with float32 and fp16 inputs, as test_sage_kernel does."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import relative_error, tiny_pipe, tiny_wan, video_run

pytest.importorskip("triton")

import cadence  # noqa: E402
from cadence.accel.attention import kernels  # noqa: E402
from cadence.accel.attention._sage_triton import (  # noqa: E402
    KernelConfig,
    _launch,
    _sparse_launch,
    reference_sage_attention,
    reference_sparse_sage_attention,
    sparse_config,
)
from cadence.accel.attention._triton import reference_block_sparse_attention  # noqa: E402
from cadence.accel.attention.backend import AttentionBackendConfig  # noqa: E402
from cadence.accel.attention.block_mask import BlockSparse, kv_blocks  # noqa: E402
from cadence.accel.attention.topk import TopKConfig  # noqa: E402
from cadence.accel.attention.window import WindowConfig  # noqa: E402

TILES = KernelConfig(block_m=32, block_n=16, num_warps=4, num_stages=1, exp="libdevice")  # the interpreter default


def inputs(batch, heads, seq, dim, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, seq, dim, generator=g).to(dtype) for _ in range(3)]


def random_blocks(batch, heads, seq, block, density, seed):
    """(B, H, nq, nk) bool: each key block kept with probability ``density``, diagonal kept."""
    blocks = -(-seq // block)
    mask = torch.rand(batch, heads, blocks, blocks, generator=torch.Generator().manual_seed(seed)) < density
    return mask | torch.eye(blocks, dtype=torch.bool)


def run(q, k, v, mask, block, qk_format, pv_format):
    """The kernel on its default tiles (the interpreter's 32 x 16, capped at the block) into a
    NaN-filled buffer with rows after S: every element must be written, and nothing past S."""
    num, idx = kv_blocks(mask)
    batch, heads, seq, dim = q.shape
    config = sparse_config(dim, block, q.device, qk_format, pv_format)
    buffer = torch.full((batch, heads, seq + 8, dim), float("nan"), dtype=q.dtype)
    out = _sparse_launch(q, k, v, num, idx, block, qk_format=qk_format, pv_format=pv_format, config=config,
                         out=buffer[:, :, :seq])
    assert torch.isnan(buffer[:, :, seq:]).all(), "wrote past S"
    assert not torch.isnan(out).any(), "left elements unwritten"
    expected = reference_sparse_sage_attention(q, k, v, num, idx, block, qk_format=qk_format, pv_format=pv_format,
                                               block_m=config.block_m, block_n=config.block_n)
    return out, expected


@pytest.mark.parametrize(
    "qk_format, pv_format, batch, seq, dim, block, dtype, limit",
    [
        # fp8 P: the kernel rounds P against the running row max, the reference against the
        # final one (two fp8 grids, as in the dense kernel's tests): a few percent at most.
        ("int8", "fp8", 2, 72, 64, 32, torch.float32, 0.03),  # 72 = 2 * 32 + 8: a short last block
        ("fp8", "fp8", 1, 96, 128, 32, torch.float16, 0.03),
        ("int8", "fp8", 1, 80, 64, 16, torch.float32, 0.03),  # block 16: one key step per block
        # 16-bit P V: the same arithmetic as the reference but for the order of the sums, and
        # K's mean, summed in another order, which may flip a rare K value by one step of its
        # grid (test_sage_kernel's quantization test): a coarse fp8 step moves a logit more
        # (measured 7.3e-5 here; the dense kernel on the same inputs 9.7e-5).
        ("int8", "bf16", 1, 88, 64, 64, torch.float16, 2e-3),  # block 64 = 2 query tiles x 4 key steps
        ("fp8", "bf16", 2, 40, 64, 32, torch.float32, 3e-4),
    ],
)
def test_matches_reference_on_random_inputs(qk_format, pv_format, batch, seq, dim, block, dtype, limit):
    q, k, v = inputs(batch, 2, seq, dim, seed=seq + dim, dtype=dtype)
    mask = random_blocks(batch, 2, seq, block, 0.5, seed=seq)
    out, expected = run(q, k, v, mask, block, qk_format, pv_format)
    assert relative_error(out.float(), expected.float()) < limit
    assert out.shape == q.shape and out.dtype == q.dtype


def test_broadcast_masks_and_query_blocks_that_keep_nothing():
    """A (1, 1, nq, nk) mask serves every batch and head; a query block with no kept key
    block writes zeros, as the reference and the bf16 sparse kernel do."""
    q, k, v = inputs(2, 2, 72, 64, seed=11)
    mask = random_blocks(1, 1, 72, 32, 0.5, seed=12)
    mask[:, :, 1] = False
    out, expected = run(q, k, v, mask, 32, "int8", "fp8")
    assert (out[:, :, 32:64] == 0).all() and (expected[:, :, 32:64] == 0).all()
    assert relative_error(out, expected) < 0.03


@pytest.mark.parametrize("qk_format, pv_format", [("int8", "fp8"), ("fp8", "fp8"), ("int8", "bf16")])
def test_every_block_kept_is_the_dense_sage_kernel_bit_for_bit(qk_format, pv_format):
    """Same tiles, same quantization, the key tiles in the same order through the same
    _scores and _update: the dense kernel's output exactly (S = 40: a short last block)."""
    q, k, v = inputs(1, 2, 40, 64, seed=21)
    everything = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    out, expected = run(q, k, v, everything, 32, qk_format, pv_format)
    dense = _launch(q, k, v, qk_format=qk_format, pv_format=pv_format, config=TILES)
    assert torch.equal(out, dense)
    dense_reference = reference_sage_attention(q, k, v, qk_format=qk_format, pv_format=pv_format, block_m=32,
                                               block_n=16)
    assert torch.equal(expected, dense_reference)


def test_reference_is_close_to_exact_block_sparse_attention():
    """The quantization's cost on the kept blocks is the dense kernel's: relative L2 vs
    float32 block-sparse attention (measured 0.035 int8 / 0.050 fp8; cosine 0.9994 / 0.9987)."""
    q, k, v = inputs(2, 3, 200, 64, seed=5)
    num, idx = kv_blocks(random_blocks(2, 3, 200, 32, 0.4, seed=6))
    exact = reference_block_sparse_attention(q, k, v, num, idx, 32)
    for qk_format, limit in (("int8", 0.05), ("fp8", 0.07)):
        out = reference_sparse_sage_attention(q, k, v, num, idx, 32, qk_format=qk_format, pv_format="fp8",
                                              block_m=32, block_n=32)
        assert relative_error(out, exact) < limit
        assert F.cosine_similarity(out.flatten(), exact.flatten(), dim=0) > 0.997


def test_tiles_are_capped_at_the_block_size():
    config = sparse_config(64, 16, torch.device("cpu"))
    assert (config.block_m, config.block_n) == (16, 16)
    q, k, v = inputs(1, 1, 64, 64, seed=0)
    num, idx = kv_blocks(random_blocks(1, 1, 64, 16, 0.5, seed=0))
    with pytest.raises(ValueError, match=r"config tiles 32 x 16 must divide block_size=16"):
        _sparse_launch(q, k, v, num, idx, 16, config=KernelConfig(block_m=32, block_n=16))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(qk_format="int4"), r"qk_format='int4'; expected one of \('int8', 'fp8'\)"),
        (dict(block_size=24), r"block_size=24 must be a power of two"),
        (dict(kv_num_blocks=torch.zeros(1, 2, 5, dtype=torch.int32)), r"kv_num_blocks has shape \(1, 2, 5\); expected"),
        (dict(kv_indices=torch.zeros(1, 2, 3, 3, dtype=torch.int64)), r"kv_indices must be int32"),
        (dict(k=torch.zeros(1, 2, 40, 64), v=torch.zeros(1, 2, 40, 64)), r"shapes differ"),
    ],
)
def test_bad_arguments_refused(change, message):
    q, k, v = inputs(1, 2, 72, 64, seed=0)
    num, idx = kv_blocks(random_blocks(1, 2, 72, 32, 0.5, seed=0))
    args = dict(q=q, k=k, v=v, kv_num_blocks=num, kv_indices=idx, block_size=32, qk_format="int8",
                pv_format="fp8") | change
    with pytest.raises(ValueError, match=message):
        _sparse_launch(**args, config=TILES)


def test_attend_dispatches_precision_to_the_kernel_and_its_reference():
    """kernels.attend: backend='triton' runs the kernel (the interpreter here), 'reference'
    the emulation on the H100 tiles capped at the block; the two agree as above (measured
    0.013 relative L2), and int8 is off the bf16 sparse path by its quantization (0.035)."""
    q, k, v = inputs(1, 2, 64, 64, seed=31)
    sparse = BlockSparse(random_blocks(1, 1, 64, 16, 0.5, seed=32), 16, 64)
    kernel = kernels.attend(q, k, v, sparse, backend="triton", precision="int8")
    reference = kernels.attend(q, k, v, sparse, backend="reference", precision="int8")
    bf16 = kernels.attend(q, k, v, sparse, backend="reference")
    assert relative_error(kernel, reference) < 0.03
    assert 0 < relative_error(reference, bf16) < 0.05
    with pytest.raises(ValueError, match=r"backend='flex' has no low-bit path \(valid: auto, triton, reference\)"):
        kernels.attend(q, k, v, sparse, backend="flex", precision="int8")


# -- the recipe: a pattern and a precision together -------------------------------------

VIDEO = dict(frames=4, height=16, width=16)  # 4 x 8 x 8 = 256 video tokens: 16 blocks of 16


def _video(pipe):
    return pipe(**{**video_run(steps=3), **VIDEO}).frames


@pytest.fixture(scope="module")
def pipe64():
    """A tiny Wan pipeline with head size 64, the sage kernels' smallest."""
    return tiny_pipe("video", tiny_wan(attention_head_dim=64, num_layers=2))


def test_int8_sparse_window_changes_the_output_within_bound_and_remove_restores(pipe64):
    """precision='int8' on the kept blocks: the same pattern (same density reported), an
    output a little off the bf16 sparse one (measured 4.1e-4 relative L2 here, a fifth of
    what the pattern itself moves the output: 2.1e-3), and remove() gives back the model
    exactly."""
    baseline = _video(pipe64)
    settings = dict(density=0.5, block=16, dense_fraction=0.25)
    with cadence.accelerate(pipe64, WindowConfig(**settings)) as acceleration:
        bf16 = _video(pipe64)
        bf16_stats = acceleration.stats()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU's "PyTorch emulation runs" notice
        with cadence.accelerate(pipe64, WindowConfig(**settings, precision="int8")) as acceleration:
            int8 = _video(pipe64)
            int8_stats = acceleration.stats()
    assert int8_stats == bf16_stats
    assert torch.isfinite(int8).all() and not torch.equal(int8, bf16)
    assert relative_error(int8, bf16) < 5e-3
    assert torch.equal(_video(pipe64), baseline)


def test_dense_steps_run_at_the_same_precision(pipe64):
    """Every step dense: the pattern's int8 is the dense sage backend, bit for bit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with cadence.accelerate(pipe64, WindowConfig(density=0.5, block=16, dense_fraction=1.0, precision="int8")):
            pattern = _video(pipe64)
        with cadence.accelerate(pipe64, AttentionBackendConfig(backend="sage")):
            sage = _video(pipe64)
    assert torch.equal(pattern, sage)


def test_head_size_the_kernel_cannot_take_runs_at_model_precision_with_a_warning():
    """Head size 12 (the default tiny Wan): the low-bit kernel has no such D; the pattern
    then runs as precision='bf16' exactly, and says so."""
    pipe = tiny_pipe("video")
    settings = dict(density=0.5, block=16, dense_fraction=0.0)
    with cadence.accelerate(pipe, TopKConfig(**settings)):
        bf16 = _video(pipe)
    kernels._warn_once.cache_clear()
    with pytest.warns(UserWarning, match=r"precision='fp8': the sparse sage kernel takes no head size 12"):
        with cadence.accelerate(pipe, TopKConfig(**settings, precision="fp8")):
            fp8 = _video(pipe)
    assert torch.equal(fp8, bf16)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(precision="int4"), r"sparse-window: precision='int4'; valid: bf16, int8, fp8"),
        (dict(precision="int8", backend="flex"),
         r"sparse-window: precision='int8' with backend='flex'.*valid backends with it: auto, triton, reference"),
    ],
)
def test_bad_precision_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        WindowConfig(**settings)


def test_the_dense_calls_take_the_patterns_precision():
    assert WindowConfig(precision="fp8", backend="triton").dense_backend == "sage-fp8"
    assert WindowConfig(precision="int8").dense_backend == "sage"
    assert WindowConfig().dense_backend == "auto"  # today's default: unchanged
