"""Patch-parallel VAE decode: each rank decodes one horizontal band of the latent video, and
the bands are gathered into the whole video on every rank.

After the denoising loop every rank holds the same latent (B, C, T, H, W), and today each
decodes all of it. Here rank r decodes latent rows ``[start_r, end_r)`` (bands as even as
integers allow) plus ``halo`` rows above and below where it has a neighbour, with the
model's own ``_decode``: Wan's decoder still runs frame by frame with its causal feature
cache, so the time axis is untouched. The halo rows are cropped off in pixel space and the
bands all-gathered (every rank gets the video: the pipeline goes on to post-process it on
every rank, and an all-gather moves each band once to every rank, as many bytes per link as a
gather to rank 0; neither is timed yet).

Which of AutoencoderKLWan's decoder ops see more than a pixel's neighbourhood:

- ``WanCausalConv3d`` (3x3 spatially), nearest upsampling, ``DupUp3D`` (Wan 2.2),
  ``patchify``: local; a band with enough halo computes them as one process does.
- ``WanRMS_norm``: normalises over *channels* at each position (``F.normalize(dim=1)``),
  not over the frame (no GroupNorm in this VAE): local.
- ``WanAttentionBlock`` (the mid block's, at latent resolution): single-head attention over
  all H x W positions of each frame. This is the one whole-frame op. A band alone would
  attend over its own rows only; instead each rank all-gathers the attention's input rows
  of every band's core (exact once the halo covers the 3 latent rows of ``conv_in`` and the
  first mid-block residual block before it), attends over the whole frame as one process
  does, and keeps its band's rows (its halo rows too, so they leave the attention exact).
  It costs one all-gather per frame chunk at latent resolution (C x H x W per rank) and
  the attention repeated on every rank, at latent resolution where the decoder's convolutions
  run at 2x to 8x (expected small; not timed). A halo under 3 rows feeds the attention a wrong seam, and the attention
  spreads that error over the whole frame (measured: 33 dB at halo 1 on the tiny config,
  the error no longer confined to the seam).

So the one approximation is the zero padding at a band's inner edge: a convolution there
sees zeros where one process sees the neighbour's rows, and the error walks inward one row
(at that block's resolution) per 3x3 convolution. ``exact_halo`` counts that reach for
Wan 2.1's decoder: in output pixel rows, 8 per latent-resolution convolution (the second
mid residual block's 2 and up block 0's 6), 4 per 2x one, 2 per 4x, 1 per 8x, 114 in all,
so a halo of 15 latent rows decodes as one process does (measured on the CPU: bit for bit at
the tiny test config's 11; to 2.3e-6, float rounding, at 15 on Wan 2.1's architecture with a
third of its channels). A smaller halo trades exactness near the seams for less duplicated
work (a rank decodes ``H / world + 2 * halo`` rows); the error is small because the
padding's effect fades along the way (PSNR against one process: benchmarks/RESULTS.md,
``benchmarks/parallel_vae.py``).

Differences from the published method (xDiT's DistVAE / PatchVAE, Fang et al., "xDiT: an
Inference Engine for Diffusion Transformers with Massive Parallelism", 2024): DistVAE
exchanges the boundary rows before *every* convolution and all-reduces GroupNorm statistics,
which is exact at any halo with no duplicated rows but needs its own convolution and norm
layers and a collective per layer. Here the decoder runs unchanged (diffusers' ``_decode``,
its feature cache and its tiling rules) and pays for it with duplicated halo rows; like
diffusers' ``tiled_decode`` it decodes overlapping spatial regions, but crops the overlap
instead of blending it, since each band's own rows are the ones it decoded with context on
both sides. Only AutoencoderKLWan is supported: AutoencoderKL (FLUX, SD) normalises with
GroupNorm over the whole frame in every residual block, which bands alone cannot reproduce.
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.distributed as dist
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.autoencoders.vae import DecoderOutput

from cadence.parallel.config import DEFAULT_VAE_HALO

ATTENTION_HOOK = "cadence.parallel.vae_attention"
SUPPORTED = ("AutoencoderKLWan",)


def supported(vae) -> bool:
    return type(vae).__name__ in SUPPORTED


def exact_halo(vae) -> int | None:
    """Latent rows of halo that make the bands decode as one process does: the reach, after the
    mid block's attention, of the zero padding at a band's edge (module docstring). None for
    decoders this count does not describe (Wan 2.2's residual one)."""
    config = vae.config
    if getattr(config, "is_residual", False) or getattr(config, "patch_size", None) is not None:
        return None
    ratio = vae.spatial_compression_ratio  # output pixel rows per latent row
    reach = 2 * ratio  # the mid block's second residual block, at latent resolution
    scale, blocks = 1, len(config.dim_mult)
    for index in range(blocks):
        reach += 2 * (config.num_res_blocks + 1) * ratio // scale  # residual blocks: two 3x3 convolutions each
        if index < blocks - 1:  # every up block but the last upsamples 2x, then convolves
            scale *= 2
            reach += ratio // scale
    reach += 1  # conv_out
    return -(-reach // ratio)


def band_bounds(height: int, world: int) -> list[tuple[int, int]]:
    """Each rank's core latent rows ``[start, end)``: contiguous, as even as integers allow."""
    edges = [height * rank // world for rank in range(world + 1)]
    return list(pairwise(edges))


class _Band:
    """The band a rank decodes now, in latent rows: its core [start, end) inside the decoded
    rows [low, high) of a frame ``height`` rows tall."""

    def __init__(self, low: int, start: int, end: int, high: int, height: int):
        self.low, self.start, self.end, self.high, self.height = low, start, end, high, height


class _WholeFrameAttention(ModelHook):
    """Runs a decoder attention block over the whole frame: gathers every rank's core rows of
    its input, attends as one process does, returns this band's decoded rows."""

    def __init__(self, parallel: PatchParallelVae):
        super().__init__()
        self.parallel = parallel

    def new_forward(self, module, x):
        band = self.parallel.band
        if band is None:  # a decode outside the patch-parallel one (none today): the frame is whole
            return self.fn_ref.original_forward(x)
        scale = x.shape[-2] // (band.high - band.low)  # (B, C, T, rows, W): rows at this block's resolution
        core = x[..., (band.start - band.low) * scale:(band.end - band.low) * scale, :]
        whole = self.parallel.gather_rows(core, scale)  # (B, C, T, height * scale, W)
        return self.fn_ref.original_forward(whole)[..., band.low * scale:band.high * scale, :]


class PatchParallelVae:
    """The handle of one application on a VAE; ``remove()`` gives back its own decode."""

    def __init__(self, vae, group: dist.ProcessGroup | None = None, halo: int = DEFAULT_VAE_HALO):
        check(vae, halo)
        self.vae, self.group, self.halo = vae, group, halo
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.band: _Band | None = None
        self.attentions = [module for module in vae.decoder.modules() if type(module).__name__ == "WanAttentionBlock"]
        for module in self.attentions:
            HookRegistry.check_if_exists_or_initialize(module).register_hook(_WholeFrameAttention(self), ATTENTION_HOOK)
        vae._decode = self._decode  # the instance attribute shadows the class's; remove() deletes it

    def _decode(self, z: torch.Tensor, return_dict: bool = True):
        check_tiling(self.vae)
        height = z.shape[-2]
        if height < self.world:
            raise ValueError(f"parallel vae: a latent {height} rows tall cannot be split into {self.world} bands of at "
                             f"least one row; use vae=0 or fewer processes (at most {height})")
        start, end = band_bounds(height, self.world)[self.rank]
        low, high = max(0, start - self.halo), min(height, end + self.halo)
        self.band = _Band(low, start, end, high, height)
        try:
            decoded = type(self.vae)._decode(self.vae, z[..., low:high, :]).sample  # (B, 3, frames, rows * scale, W')
        finally:
            self.band = None
        scale = decoded.shape[-2] // (high - low)
        video = self.gather_rows(decoded[..., (start - low) * scale:(end - low) * scale, :], scale, height)
        return DecoderOutput(sample=video) if return_dict else (video,)

    def gather_rows(self, core: torch.Tensor, scale: int, height: int | None = None) -> torch.Tensor:
        """Every rank's ``core`` rows (its band's, ``scale`` rows per latent row), stacked along
        the height in rank order on every rank."""
        bounds = band_bounds(height if height is not None else self.band.height, self.world)
        tallest = max(end - start for start, end in bounds) * scale
        padded = core.new_zeros(*core.shape[:-2], tallest, core.shape[-1])  # all_gather wants equal shapes
        padded[..., :core.shape[-2], :] = core
        parts = [torch.empty_like(padded) for _ in bounds]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        return torch.cat([part[..., :(end - start) * scale, :] for part, (start, end) in zip(parts, bounds)], dim=-2)

    def remove(self) -> None:
        if "_decode" in vars(self.vae):
            del self.vae._decode
        for module in self.attentions:
            HookRegistry.check_if_exists_or_initialize(module).remove_hook(ATTENTION_HOOK, recurse=False)
        self.attentions = []


def check(vae, halo: int) -> None:
    if vae is None or not supported(vae):
        found = "the pipeline has no vae" if vae is None else f"{type(vae).__name__} is not supported"
        raise ValueError(f"parallel vae: {found}; supported VAE classes: {', '.join(SUPPORTED)} (AutoencoderKL "
                         "normalises with GroupNorm over the whole frame, which a band alone cannot reproduce); "
                         "use vae=0")
    if not isinstance(halo, int) or isinstance(halo, bool) or halo < 0:
        exact = exact_halo(vae)
        raise ValueError(f"parallel vae_halo={halo!r} must be an integer >= 0 (latent rows; "
                         + (f"{exact} or more decodes as one process does)" if exact else "more is closer to one process)"))
    check_tiling(vae)


def check_tiling(vae) -> None:
    """Tiled decode runs a different number of attention calls per band: ranks would wait on
    each other's gathers forever."""
    if getattr(vae, "use_tiling", False):
        raise ValueError("parallel vae: the VAE has tiling on (enable_tiling()); patch-parallel decode already splits "
                         "the frame: call vae.disable_tiling(), or use vae=0 to keep tiled decode")


def apply(vae, group: dist.ProcessGroup | None = None, halo: int = DEFAULT_VAE_HALO) -> PatchParallelVae | None:
    """Patch-parallel decode on ``vae`` over ``group``'s ranks; None (nothing applied) on one rank."""
    check(vae, halo)  # the same configurations are refused on one process as on several
    if dist.get_world_size(group) == 1:
        return None
    return PatchParallelVae(vae, group, halo)
