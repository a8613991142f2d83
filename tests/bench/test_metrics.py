import math

import numpy as np
import pytest
import torch

from cadence.bench.metrics import ForwardShares, ideal_speedup, psnr, ssim, work_fraction
from cadence.recipe import Recipe


def _video(t=3, h=16, w=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(t, 3, h, w, generator=g) * 2 - 1  # (T, 3, H, W) in [-1, 1]


def _noisy(x, sigma, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1)


# ---------------------------------------------------------------- psnr


def test_psnr_identical_is_inf():
    x = _video()
    assert psnr(x, x.clone()) == float("inf")


def test_psnr_constant_offset_matches_closed_form():
    x = _video() * 0.5  # keep x + 0.1 inside [-1, 1]
    # MSE = 0.01 on range 2: 10 * log10(4 / 0.01) = 26.0206 dB
    assert psnr(x + 0.1, x) == pytest.approx(10 * math.log10(4 / 0.01), abs=1e-6)


def test_psnr_decreases_with_noise():
    x = _video()
    values = [psnr(_noisy(x, s), x) for s in (0.01, 0.05, 0.2)]
    assert values[0] > values[1] > values[2]


def test_psnr_accepts_images_and_bf16():
    x = _video(t=1)[0]  # (3, H, W)
    assert math.isfinite(psnr(x + 0.1, x))
    assert psnr((x + 0.1)[None], x[None]) == pytest.approx(psnr(x + 0.1, x))
    assert math.isfinite(psnr(x.bfloat16(), (x * 0.9).bfloat16()))


# ---------------------------------------------------------------- ssim


def _gaussian_window_np(size, sigma=1.5):
    c = np.arange(size) - (size - 1) / 2
    g = np.exp(-(c**2) / (2 * sigma**2))
    g /= g.sum()
    return np.outer(g, g)


def _ssim_reference(x, y, data_range=2.0, size=11):
    """Straight-from-the-paper SSIM with explicit loops over valid window positions."""
    w = _gaussian_window_np(size)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for a, b in zip(x.reshape(-1, *x.shape[-2:]), y.reshape(-1, *y.shape[-2:])):  # per channel
        for i in range(a.shape[0] - size + 1):
            for j in range(a.shape[1] - size + 1):
                pa, pb = a[i : i + size, j : j + size], b[i : i + size, j : j + size]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va = (w * (pa - ma) ** 2).sum()
                vb = (w * (pb - mb) ** 2).sum()
                cov = (w * (pa - ma) * (pb - mb)).sum()
                values.append(
                    ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
                )
    return float(np.mean(values))


def test_ssim_identical_is_one():
    x = _video()
    assert ssim(x, x.clone()) == pytest.approx(1.0, abs=1e-6)


def test_ssim_drops_with_noise():
    x = _video()
    values = [ssim(_noisy(x, s), x) for s in (0.02, 0.1, 0.4)]
    assert values[0] < 1.0
    assert values[0] > values[1] > values[2]


def test_ssim_matches_numpy_reference():
    x = _video(t=1, h=15, w=17, seed=3)[0]  # (3, 15, 17)
    y = _noisy(x, 0.2, seed=4)
    expected = _ssim_reference(x.double().numpy(), y.double().numpy())
    assert ssim(y, x) == pytest.approx(expected, abs=1e-5)


def test_ssim_small_frames_shrink_window():
    x = _video(t=2, h=8, w=8)
    y = _noisy(x, 0.1)
    value = ssim(y, x)
    assert 0.0 < value < 1.0
    # 8 px frames use the largest odd window that fits: 7x7.
    expected = _ssim_reference(x.double().numpy(), y.double().numpy(), size=7)
    assert value == pytest.approx(expected, abs=1e-5)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("metric", [psnr, ssim])
def test_shape_mismatch_names_both_shapes(metric):
    with pytest.raises(ValueError) as info:
        metric(torch.zeros(2, 3, 8, 8), torch.zeros(3, 3, 8, 8))
    assert "(2, 3, 8, 8)" in str(info.value) and "(3, 3, 8, 8)" in str(info.value)


def test_ideal_speedup():
    assert ideal_speedup(1.0) == 1.0
    assert ideal_speedup(0.25) == pytest.approx(4.0)
    for bad in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError):
            ideal_speedup(bad)


def test_work_fraction_composes_step_and_attention_work():
    half = ForwardShares(attention=0.5, linear=0.2)
    assert work_fraction({}) is None
    assert work_fraction({"compute_fraction": 0.4}) == 0.4
    # attention at half the forward, a tenth of it kept: 1 - 0.5 * 0.9 of the forward
    assert work_fraction({"attention_fraction": 0.1}, half) == pytest.approx(0.55)
    assert work_fraction({"compute_fraction": 0.4, "attention_fraction": 0.1}, half) == pytest.approx(0.22)
    assert work_fraction({"attention_fraction": 1.0}) == 1.0


def test_work_fraction_of_a_composed_recipe_multiplies_every_level():
    shares = ForwardShares(attention=0.5, linear=0.2)  # the rest: 0.3
    recipe = Recipe.parse("fixed-interval(budget=0.4) + compile + fp8 + attention-backend(backend='sage')")
    fp8, sage = 1 - 0.2 * (1 - 774 / 1391), 1 - 0.5 * (1 - 774 / 1391)
    assert work_fraction({}, shares, Recipe.parse("fp8")) == pytest.approx(fp8)
    assert work_fraction({}, shares, Recipe.parse("compile")) == pytest.approx(0.7)
    assert work_fraction({}, shares, Recipe.parse("weight-int4")) is None  # no compute removed
    left = 1 - 0.2 * (1 - 774 / 1391) - 0.5 * (1 - 774 / 1391) - 0.3
    assert work_fraction({"compute_fraction": 0.4}, shares, recipe) == pytest.approx(0.4 * left)
