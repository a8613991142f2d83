"""QuantLinear against the float linear on fresh random inputs: an error bound per mode,
the native kernels against the reference path, scales on outlier inputs."""

import pytest
import torch
from conftest import relative_error, seeded_randn

from cadence.accel.quant.calibration import smoothing_factors
from cadence.accel.quant.formats import FORMATS
from cadence.accel.quant.linear import QuantLinear

# Relative output error ||y_q - y|| / ||y|| on Gaussian inputs and weights, per mode: what
# each format's rounding gives at K = 256 with margin (measured on this test's input: fp8
# 0.036, int8 0.008, weight-int8 0.004, weight-int4 0.064, weight-int2 0.32, nvfp4 0.14,
# mxfp4 0.19).
BOUND = {"fp8": 0.05, "int8": 0.02, "weight-int8": 0.01, "weight-int4": 0.12, "weight-int2": 0.6,
         "nvfp4": 0.2, "mxfp4": 0.25}


def _linear(in_features=256, out_features=128, seed=0, bias=True):
    torch.manual_seed(seed)
    return torch.nn.Linear(in_features, out_features, bias=bias)


@pytest.mark.parametrize("mode", sorted(FORMATS))
def test_each_mode_is_within_its_error_bound(mode):
    assert set(BOUND) == set(FORMATS)
    linear = _linear(seed=1)
    x = seeded_randn(3, 40, 256, seed=2)  # (B, tokens, in): leading dims are kept
    with torch.no_grad():
        reference = linear(x)
        y = QuantLinear.from_linear(linear, mode, group=64)(x)
    assert y.shape == reference.shape and y.dtype == reference.dtype
    assert relative_error(y, reference) < BOUND[mode]
    assert relative_error(y, reference) > 0  # it really is quantized


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_native_kernel_matches_the_reference_path(mode):
    """torch._scaled_mm and torch._int_mm also run on the CPU: the fast path's call (scale
    layouts, transposes, bias) is checked against the emulation here."""
    linear = _linear(seed=3)
    x = seeded_randn(50, 256, seed=4)
    with torch.no_grad():
        native = QuantLinear.from_linear(linear, mode, kernel="native")
        reference = QuantLinear.from_linear(linear, mode, kernel="reference")
        assert native.native and not reference.native
        y_native, y_reference = native(x), reference(x)
    tolerance = 1e-2 if mode == "fp8" else 1e-5  # fp8 runs out in bf16; int8 accumulates exactly
    assert relative_error(y_native, y_reference) < tolerance


def test_per_token_scales_keep_an_outlier_token_from_hurting_the_others():
    linear = _linear(seed=5, bias=False)
    x = seeded_randn(64, 256, seed=6)
    x[7] *= 1000.0
    with torch.no_grad():
        reference = linear(x)
        dynamic = QuantLinear.from_linear(linear, "int8")(x)
        static = QuantLinear.from_linear(linear, "int8", static_absmax=float(x.abs().max()))(x)
    rows = torch.arange(64) != 7
    assert relative_error(dynamic[rows], reference[rows]) < BOUND["int8"]
    assert relative_error(static[rows], reference[rows]) > 10 * relative_error(dynamic[rows], reference[rows])


def test_per_channel_weight_scales_keep_an_outlier_channel_from_hurting_the_others():
    linear = _linear(seed=7, bias=False)
    with torch.no_grad():
        linear.weight[3] *= 500.0
        x = seeded_randn(32, 256, seed=8)
        reference = linear(x)
        y = QuantLinear.from_linear(linear, "fp8")(x)
    others = torch.arange(128) != 3
    assert relative_error(y[:, others], reference[:, others]) < BOUND["fp8"]


def test_smoothquant_moves_activation_outliers_into_the_weight():
    """A few input channels 50x larger than the rest (what diffusion transformers' activations
    show): migrating them (alpha 0.5) cuts INT8's error, and the float result is unchanged."""
    linear = _linear(seed=9, bias=False)
    x = seeded_randn(128, 256, seed=10)
    x[:, :4] *= 50.0
    with torch.no_grad():
        reference = linear(x)
        smooth = smoothing_factors(x.abs().amax(dim=0), linear.weight, 0.5)
        plain = QuantLinear.from_linear(linear, "int8")(x)
        smoothed = QuantLinear.from_linear(linear, "int8", smooth=smooth)(x)
        torch.testing.assert_close(torch.nn.functional.linear(x / smooth, linear.weight * smooth), reference,
                                   rtol=1e-4, atol=1e-3)
    assert relative_error(smoothed, reference) < 0.5 * relative_error(plain, reference)


def test_svdquant_low_rank_branch_absorbs_a_low_rank_outlier():
    linear = _linear(seed=11, bias=False)
    with torch.no_grad():
        linear.weight += 20.0 * seeded_randn(128, 1, seed=12) @ seeded_randn(1, 256, seed=13) / 16  # a rank-one spike
        x = seeded_randn(32, 256, seed=14)
        reference = linear(x)
        plain = QuantLinear.from_linear(linear, "nvfp4")(x)
        low_rank = QuantLinear.from_linear(linear, "nvfp4", rank=4)(x)
    assert relative_error(low_rank, reference) < 0.7 * relative_error(plain, reference)


def test_weight_bytes_are_what_each_format_promises():
    linear = _linear(1024, 256, seed=15, bias=False)
    full = 2 * linear.weight.numel()  # bf16
    expected = {"fp8": 0.5, "int8": 0.5, "weight-int8": 0.5, "weight-int4": 0.25 + 2 / 128, "weight-int2": 0.125 + 2 / 128,
                "nvfp4": 0.25 + 0.5 / 16, "mxfp4": 0.25 + 0.5 / 32}
    for mode, fraction in expected.items():
        stored = QuantLinear.from_linear(linear, mode, group=128).weight_bytes
        assert abs(stored / full - fraction) < 0.01, mode


def test_triton_activation_quantizer_matches_the_reference():
    """The one-pass Triton quantizer (run by Triton's interpreter here) against formats':
    codes equal up to rounding ties, scales and row maxima equal, every element written."""
    pytest.importorskip("triton")
    from cadence.accel.quant import formats
    from cadence.accel.quant._kernels import quantize_rows

    x = seeded_randn(19, 200, seed=16)  # 200: not a power of two, the last chunk is masked
    inv_smooth = 1.0 / (1.0 + seeded_randn(200, seed=17).abs())
    for fmt, dtype, qmax in (("fp8", formats.FP8, formats.FP8_MAX), ("int8", torch.int8, formats.INT8_MAX)):
        q, scale, amax = quantize_rows(x, dtype, qmax, inv_smooth)
        smoothed = x * inv_smooth
        torch.testing.assert_close(amax, smoothed.abs().amax(dim=-1))
        torch.testing.assert_close(scale, formats.absmax_scale(smoothed, qmax))
        quantize = formats.quantize_fp8 if fmt == "fp8" else formats.quantize_int8
        expected = quantize(smoothed, scale).float()
        if fmt == "int8":
            assert (q.float() - expected).abs().max() <= 1.0  # ties round away from zero, not to even
        else:
            # Triton 3.6's interpreter casts values just below a power of two to half of it
            # (124.7 -> 64, where the GPU's cvt gives 128): compare where it does not.
            assert (q.float() != expected).float().mean() < 0.05
        static = torch.tensor([0.05])
        q, scale, _ = quantize_rows(x, dtype, qmax, None, static)
        assert torch.equal(scale, static.expand(19, 1))
        mismatched = (q.float() - quantize(x, static).float()).abs() > (1.0 if fmt == "int8" else 0.0)
        assert mismatched.float().mean() < (1e-9 if fmt == "int8" else 0.05)


def test_nan_in_the_input_is_flagged():
    linear = _linear(seed=18)
    for mode in ("fp8", "weight-int4"):
        module = QuantLinear.from_linear(linear, mode, group=64)
        flags = torch.ones(2, dtype=torch.uint8)
        module.monitor = flags[1:2]
        x = seeded_randn(4, 256, seed=19)
        module(x)
        assert flags.all()
        x[2, 5] = float("nan")
        module(x)
        assert flags.tolist() == [1, 0], mode


def test_triton_quantizer_flags_a_nan_row_without_another_kernel():
    pytest.importorskip("triton")
    from cadence.accel.quant import formats
    from cadence.accel.quant._kernels import quantize_rows

    flags = torch.ones(3, dtype=torch.uint8)
    x = seeded_randn(37, 96, seed=20)
    quantize_rows(x, formats.FP8, formats.FP8_MAX, flag=flags[1:2])
    assert flags.tolist() == [1, 1, 1]
    x[30, 4] = float("inf")
    quantize_rows(x, torch.int8, formats.INT8_MAX, flag=flags[1:2])
    assert flags.tolist() == [1, 0, 1]


def test_triton_int8_epilogue_matches_the_reference():
    pytest.importorskip("triton")
    from cadence.accel.quant._kernels import dequantize_int32

    acc = torch.randint(-2**20, 2**20, (45, 300), generator=torch.Generator().manual_seed(21), dtype=torch.int32)
    row, col, bias = seeded_randn(45, 1, seed=22).abs(), seeded_randn(1, 300, seed=23).abs(), seeded_randn(300, seed=24)
    expected = acc.float() * row * col + bias
    torch.testing.assert_close(dequantize_int32(acc, row, col, bias, torch.float32), expected, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(dequantize_int32(acc, row, col, None, torch.float32), expected - bias, rtol=1e-6, atol=1e-3)


def test_fp8_on_a_gpu_without_fp8_units_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    cuda = torch.device("cuda")
    available, why = FORMATS["fp8"].fast_path(cuda)
    assert not available and why == "fp8: NVIDIA A100 has no FP8 tensor cores (needs sm89+); the reference path runs"
    assert FORMATS["int8"].fast_path(cuda) == (True, "")
    assert FORMATS["weight-int4"].fast_path(cuda) == (False, "")
