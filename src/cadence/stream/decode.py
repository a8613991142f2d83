"""Decoding a stream chunk by chunk with Wan's causal VAE, as if the whole video were decoded
at once.

``AutoencoderKLWan`` decodes a latent video one latent frame at a time, carrying the causal
3D convolutions' last frames from one call of its decoder to the next in ``_feat_map``; its
``decode`` clears that cache before and after each call, so decoding chunks separately would
restart the causality at every chunk (a seam, and only ``1 + 4 (F - 1)`` frames per chunk
instead of ``4 F``). :class:`WanStreamDecoder` runs the same per-frame loop as the VAE's own
``_decode`` but keeps the cache between chunks: the concatenated chunks are the one-call decode
of the concatenated latents (tested), the first latent frame giving one video frame and every
later one four. It uses the VAE's cache fields (``clear_cache``, ``_feat_map``, ``_conv_idx``)
and clears them when done, as ``decode`` leaves them; tiled decoding is not supported.
"""

from __future__ import annotations

import torch


class WanStreamDecoder:
    """Latent chunks (B, z_dim, F, h, w), as the transformer made them, to video frames
    (B, 3, frames, H, W) in [-1, 1]."""

    def __init__(self, vae: torch.nn.Module):
        if not hasattr(vae, "_cached_conv_counts") or not hasattr(vae, "post_quant_conv"):
            raise ValueError(f"stream decoding takes Wan's causal VAE (AutoencoderKLWan); got {type(vae).__name__}")
        if getattr(vae, "use_tiling", False):
            raise ValueError("stream decoding does not tile: call vae.disable_tiling() (tiled decode restarts the "
                             "causal cache per tile)")
        config = vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        self.vae = vae
        # WanPipeline's normalisation: latents / (1 / std) + mean, undone before decoding.
        self.mean = torch.tensor(config.latents_mean).view(shape)
        self.std = torch.tensor(config.latents_std).view(shape)
        self.started = False

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        if not self.started:
            vae.clear_cache()
        parameter = next(vae.parameters())
        z = latents.to(parameter.device, torch.float32) * self.std.to(parameter.device) + self.mean.to(parameter.device)
        x = vae.post_quant_conv(z.to(parameter.dtype))
        frames = []
        for index in range(x.shape[2]):
            vae._conv_idx = [0]
            first = not self.started and index == 0
            frames.append(vae.decoder(x[:, :, index:index + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                      first_chunk=first))
        self.started = True
        out = torch.cat(frames, dim=2)
        if vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=vae.config.patch_size)
        return out.clamp(-1.0, 1.0)

    def close(self) -> None:
        """Leave the VAE's cache as its own ``decode`` leaves it."""
        self.vae.clear_cache()
        self.started = False
