"""The real-size transformers cadence is measured at: the configs of Wan2.1-T2V-1.3B and
FLUX.1-dev and the latent sizes of their usual outputs, shared by the real-size benchmarks
(``benchmarks/wan_realsize.py``, ``flux_realsize.py``) and ``cadence tune --speed-at``
(``cadence.tune.realsize``), which build them with random weights: a transformer's time for a
fixed amount of compute does not depend on what its weights hold."""

from __future__ import annotations

import torch

# Wan-AI/Wan2.1-T2V-1.3B transformer/config.json
WAN_1_3B = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
WAN_LATENT = {
    "frames": 21,
    "height": 60,
    "width": 104,
}  # 480 x 832 x 81 frames through the Wan VAE (4x8x8)
WAN_TEXT_TOKENS = 512  # umT5 sequence length of the Wan pipeline

# black-forest-labs/FLUX.1-dev transformer/config.json
FLUX_DEV = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
FLUX_SIDE = 64  # 1024 px / 8 (VAE) / 2 (2x2 packing): 4,096 image tokens a side squared
FLUX_TEXT_TOKENS = 512  # T5 sequence length of the FLUX pipeline


def cast_like_from_pretrained(
    model: torch.nn.Module, dtype: torch.dtype
) -> torch.nn.Module:
    """Cast to ``dtype`` as ``from_pretrained(torch_dtype=dtype)`` does: the modules a class
    names in ``_keep_in_fp32_modules`` (Wan: rope, time embedder, norms, modulation table)
    stay in float32, so a random-weight model runs the same kernels as a real checkpoint."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    torch.nn.Module.to(
        model, dtype
    )  # ModelMixin.to would warn about exactly what we undo next
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and keep.intersection(name.split(".")):
            tensor.data = tensor.data.float()
    return model
