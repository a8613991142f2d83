"""Number formats: round trips, error bounds per format, packing, the byte counts mixed
precision plans with against what the layers store."""

import pytest
import torch

from cadence.accel.quant import formats


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (5, 64), generator=torch.Generator().manual_seed(bits)).to(torch.uint8)
    packed = formats.pack(codes, bits)
    assert packed.shape == (5, 64 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(formats.unpack(packed, bits), codes)


def test_fp8_error_is_within_half_a_step_of_e4m3():
    """e4m3 keeps 3 mantissa bits: a normal value is off by at most 2**-4 of itself."""
    x = _randn(64, 256) * 3
    scale = formats.absmax_scale(x, formats.FP8_MAX)
    back = formats.quantize_fp8(x, scale).float() * scale
    normal = (x / scale).abs() >= 2.0 ** -6
    assert ((back - x).abs()[normal] <= 2.0 ** -4 * x.abs()[normal] + 1e-7).all()
    assert (back.abs().amax(dim=-1) <= x.abs().amax(dim=-1) * (1 + 1e-6)).all()  # the max is kept


def test_int8_error_is_half_a_step():
    x = _randn(64, 256)
    scale = formats.absmax_scale(x, formats.INT8_MAX)
    back = formats.quantize_int8(x, scale).float() * scale
    assert ((back - x).abs() <= scale / 2 + 1e-7).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_groupwise_error_is_half_a_step_per_group(bits):
    w = _randn(32, 256, seed=bits)
    tensors = formats.quantize_groupwise(w, bits, group=64)
    assert tensors["codes"].numel() == w.numel() * bits // 8
    back = formats.dequantize_groupwise(tensors, bits, torch.float32)
    step = tensors["scale"].float().repeat_interleave(64, dim=1)
    # fp16 offset: half a step plus the offset's own rounding
    assert ((back - w).abs() <= step / 2 + 2e-3 * w.abs().amax()).all()


def test_e2m1_grid_values_round_trip_exactly():
    grid = torch.tensor(formats.E2M1_VALUES)
    values = torch.cat([grid, -grid[1:]]).repeat(3)[:32].reshape(1, 32) * 4  # amax 24 = 6 x 4: scale 4
    for fmt in (formats.NVFP4, formats.MXFP4):
        assert torch.equal(fmt.fake_quantize_activations(values), values), fmt


@pytest.mark.parametrize("kind", ["nvfp4", "mxfp4"])
def test_fp4_error_is_bounded_by_the_block_scale(kind):
    """E2M1's widest gap is 4 -> 6: a value is off by at most one block scale (MXFP4's power-
    of-two scale may also clip its block's max at 6 x scale, under 2x the scale away)."""
    x = _randn(16, 128, seed=3) * torch.logspace(-2, 2, 16).unsqueeze(1)  # rows of very different sizes
    fmt = formats.FORMATS[kind]
    tensors = fmt.quantize(x)
    assert tensors["codes"].shape == (16, 64)  # two codes a byte
    back = fmt.dequantize(tensors, torch.float32)
    scale = fmt.block_scale(tensors).repeat_interleave(fmt.block, dim=1)
    limit = scale * (1.0 if kind == "nvfp4" else 2.0) + 1e-6
    assert ((back - x).abs() <= limit).all()
    assert (back - x).norm() / x.norm() < 0.15


def test_mxfp4_scales_are_powers_of_two_and_nvfp4_scales_are_fp8():
    x = _randn(4, 64)
    mx = formats.MXFP4.quantize(x)
    assert mx["block_scale"].dtype == torch.uint8
    scale = formats.MXFP4.block_scale(mx)
    assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)
    nv = formats.NVFP4.quantize(x)
    assert nv["block_scale"].dtype == formats.FP8 and nv["tensor_scale"].shape == (1,)


def test_an_all_zero_row_quantizes_to_zeros():
    x = torch.zeros(2, 64)
    assert torch.equal(formats.NVFP4.fake_quantize_activations(x), x)
    scale = formats.absmax_scale(x, formats.FP8_MAX)
    assert torch.equal(formats.quantize_fp8(x, scale).float(), x)


@pytest.mark.parametrize("name", sorted(formats.FORMATS))
def test_planned_bytes_are_the_bytes_a_layer_stores(name):
    """Mixed precision allocates by stored_bytes(): it must be what quantize_weight() returns."""
    fmt = formats.FORMATS[name]
    weight = _randn(96, 256, seed=5)
    assert formats.nbytes(fmt.quantize_weight(weight, 64)) == fmt.stored_bytes(96, 256, 64)
    assert 256 % fmt.group_size(64) == 0


def test_an_unknown_format_is_refused_with_the_valid_names():
    with pytest.raises(ValueError, match="unknown quantization mode 'int3'; valid: fp8, int8, weight-int8"):
        formats.get_format("int3")
