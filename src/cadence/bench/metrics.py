"""Quality metrics of an accelerated output against the unaccelerated output of the same
prompt and seed, and the speedup an acceleration could reach at best.

Inputs are decoded pixels in [-1, 1]: videos (T, 3, H, W), images (3, H, W) or (1, 3, H, W).
Everything is computed in float64 so that near-identical outputs (PSNR 60+ dB) are not
swamped by bf16/fp32 rounding in the metric itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03


def _check_pair(x: torch.Tensor, ref: torch.Tensor) -> None:
    if tuple(x.shape) != tuple(ref.shape):
        raise ValueError(
            f"output shape {tuple(x.shape)} does not match reference shape {tuple(ref.shape)}"
        )
    if x.ndim < 2:
        raise ValueError(f"expected an image (C, H, W) or video (T, C, H, W), got shape {tuple(x.shape)}")


def _as_frames(x: torch.Tensor) -> torch.Tensor:
    """Any of (H, W), (C, H, W), (T, C, H, W) -> (N, C, H, W) float64, on x's device."""
    x = x.detach().to(torch.float64)
    if x.ndim == 2:
        return x[None, None]
    return x.reshape(-1, *x.shape[-3:])


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB over the whole tensor; +inf when identical.

    The MSE is pooled over all frames before the log (not a mean of per-frame PSNRs), so
    one identical frame cannot make the average infinite.
    """
    _check_pair(x, ref)
    mse = torch.mean((_as_frames(x) - _as_frames(ref)) ** 2).item()
    if mse == 0.0:
        return float("inf")
    return 10.0 * math.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    window = g[:, None] * g[None, :]  # (size, size), sums to 1
    return window.expand(channels, 1, size, size).contiguous()  # (C, 1, size, size)


def _ssim_window_size(h: int, w: int) -> int:
    # Frames smaller than the 11 px window would leave no valid output pixel: shrink to the
    # largest odd size that still fits (sigma stays 1.5, so tiny windows are near-uniform).
    size = min(_SSIM_WINDOW, h, w)
    return size if size % 2 == 1 else size - 1


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean structural similarity (Wang et al. 2004), 1.0 when identical.

    Matches skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=...): statistics under an 11x11 Gaussian window,
    'valid' positions only, averaged over positions, channels and frames.
    """
    _check_pair(x, ref)
    a, b = _as_frames(x), _as_frames(ref)  # (N, C, H, W)
    _, c, h, w = a.shape
    size = _ssim_window_size(h, w)
    if size < 1:
        raise ValueError(f"frames of shape {tuple(x.shape)} are too small for SSIM")
    window = _gaussian_window(size, _SSIM_SIGMA, c, a.device, a.dtype)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=c)  # (N, C, H - size + 1, W - size + 1)

    mu_a, mu_b = blur(a), blur(b)
    # Population (biased) moments, as use_sample_covariance=False.
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b

    c1 = (_SSIM_K1 * data_range) ** 2
    c2 = (_SSIM_K2 * data_range) ** 2
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    # Every frame and channel has the same number of valid positions, so the global mean
    # equals the mean of per-frame, per-channel means.
    return (num / den).mean().item()


def ideal_speedup(compute_fraction: float) -> float:
    """Upper bound on speedup when only `compute_fraction` of the transformer work runs
    (ignores the VAE, text encoder and scheduler overheads that are not skipped)."""
    try:
        fraction = float(compute_fraction)  # accepts numpy scalars and 0-d tensors too
    except (TypeError, ValueError):
        raise ValueError(f"compute_fraction must be a number, got {compute_fraction!r}") from None
    if not (0.0 < fraction <= 1.0):  # also rejects NaN
        raise ValueError(f"compute_fraction must be in (0, 1], got {compute_fraction!r}")
    return 1.0 / fraction


@dataclass(frozen=True)
class ForwardShares:
    """Where the time of one unaccelerated transformer forward goes: self-attention, the
    quantizable linears, and the rest (elementwise, norm, modulation and copy kernels,
    embeddings, launches), as fractions of the forward."""

    attention: float
    linear: float

    @property
    def other(self) -> float:
        return max(0.0, 1.0 - self.attention - self.linear)


# Wan2.1-1.3B at 480p x 81 frames on an H100 (cuDNN, diffusers bf16, DESIGN.md's profile):
# 336 ms attention and 107 ms GEMMs of 630 ms. Used for the reference models, which stand
# for that size; the real-size benchmarks measure their own shares in the run.
WAN_SHARES = ForwardShares(attention=336 / 630, linear=107 / 630)
ATTENTION_SHARE = WAN_SHARES.attention
# Ideal speedup of a low-bit matmul: its measured GEMM throughput over bf16 on the H100
# (DESIGN.md: FP8 1391, INT8 948, bf16 774 TFLOP/s). Low-precision attention (SageAttention:
# INT8 Q.K, FP8 P.V) counts at the FP8 ratio.
BIT_RATIO = {"fp8": 1391 / 774, "int8": 948 / 774}


def work_fraction(stats: dict, shares: ForwardShares = WAN_SHARES, recipe=None) -> float | None:
    """The fraction of the transformer's time a recipe would leave if the work it removes
    cost nothing (Amdahl): the step techniques' ``compute_fraction`` times, on the forwards
    that ran, what is left of each share of a forward: attention times the
    ``attention_fraction`` kept (or over the low-bit ratio), the linears over the low-bit
    GEMM ratio, the rest removed entirely by compilation (its ideal: every kernel between
    the GEMMs and attention fused away). None when the recipe removes nothing."""
    compute, attention = stats.get("compute_fraction"), stats.get("attention_fraction")
    left, removed = 1.0, compute is not None or attention is not None
    if attention is not None:
        left -= shares.attention * (1 - attention)
    for config in getattr(recipe, "techniques", ()):
        if getattr(config, "mode", None) in BIT_RATIO:
            left -= shares.linear * (1 - 1 / BIT_RATIO[config.mode])
        elif getattr(config, "backend", None) in ("sage", "sage-fp8"):
            left -= shares.attention * (1 - 1 / BIT_RATIO["fp8"])
        elif config.level == "graph":
            left -= shares.other
        else:
            continue
        removed = True
    return (1.0 if compute is None else compute) * left if removed else None


__all__ = ["psnr", "ssim", "ideal_speedup", "work_fraction", "ForwardShares", "WAN_SHARES", "ATTENTION_SHARE",
           "BIT_RATIO"]
