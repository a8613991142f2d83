"""The quantization techniques on tiny reference pipelines: they run within their error
bound, restore exactly, refuse bad configuration, calibrate, save and load, compose."""

import warnings

import pytest
import torch

import cadence
from cadence.accel.quant import checkpoint
from cadence.accel.quant.linear import QuantLinear
from cadence.accel.registry import load_builtin
from cadence.models import quantizable_linears
from tests.conftest import TEXT_DIM, tiny_pipe, tiny_sample, tiny_wan

# Relative error of the generated sample (6 steps, CFG 3) against the float model, per
# technique, on the tiny random models (measured, the larger of video and image: 0.013 /
# 0.002 / 0.001 / 0.015 / 0.045 / 0.056 / 0.036): bounds about 3x that.
TECHNIQUES = {
    "fp8": 0.04, "int8(smooth=0)": 0.01, "weight-int8": 0.005, "weight-int4(group=32)": 0.05,
    "nvfp4": 0.15, "mxfp4": 0.15, "nvfp4(rank=4)": 0.12,
}


def quant_pipe(kind):
    """A tiny pipeline whose Wan has 32-wide attention and a 64-wide FFN: groups of 16 and 32 fit."""
    wan = tiny_wan(attention_head_dim=16, ffn_dim=64, num_layers=2) if kind == "video" else None
    return tiny_pipe(kind, wan)


def _relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(autouse=True)
def _quiet_fallback():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*reference path runs")
        yield


@pytest.mark.parametrize("term", TECHNIQUES)
def test_technique_is_within_its_bound_and_remove_restores(term, kind):
    pipe = quant_pipe(kind)
    baseline = tiny_sample(pipe, kind)
    weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    with cadence.accelerate(pipe, term) as acceleration:
        quantized = tiny_sample(pipe, kind)
        stats = acceleration.stats()
    assert torch.isfinite(quantized).all()
    assert 0 < _relative(quantized, baseline) < TECHNIQUES[term]
    assert sum(stats["quantized_layers"].values()) == len(quantizable_linears(pipe.transformer))
    assert not stats["skipped_layers"] and stats["weight_memory_saved"] > 0.5  # fp32 -> <= 8 bits
    assert not any(isinstance(m, QuantLinear) for m in pipe.transformer.modules())
    assert all(torch.equal(v, weights[k]) for k, v in pipe.transformer.state_dict().items())
    assert torch.equal(tiny_sample(pipe, kind), baseline)


def test_cpu_fallback_is_announced():
    pipe = quant_pipe("video")
    with pytest.warns(UserWarning, match="fp8: no fast kernel on cpu; the reference path runs"):
        cadence.accelerate(pipe, "fp8").remove()


@pytest.mark.parametrize("term, message", [
    ("fp8(timestep_path='half')", "timestep_path='half'; valid: full, quantize"),
    ("fp8(kernel='cutlass')", "kernel='cutlass'; valid: auto, native, reference"),
    ("int8(smooth=1.5)", r"smooth=1.5 must be in \[0, 1\]"),
    ("fp8(activations='per-block')", "activations='per-block'; valid: dynamic, static"),
    ("weight-int4(group=100)", "group=100; valid: 16, 32, 64, 128, 256"),
    ("nvfp4(rank=-1)", r"rank=-1 must be in \[0, 256\]"),
    ("mixed(formats='bf16,int3')", "has \\['int3'\\]; valid: bf16, fp8"),
    ("mixed(memory=0, error=0)", "give one budget"),
    ("mixed(memory=1.5)", r"memory=1.5 must be in \(0, 1\]"),
    ("weight-int8(smooth=0.5)", "unknown parameter 'smooth' for technique 'weight-int8'"),
])
def test_bad_configuration_is_refused_with_the_valid_values(term, message):
    with pytest.raises(ValueError, match=message):
        cadence.recipe.Recipe.parse(term)


def test_a_second_quantization_is_refused_and_the_first_kept():
    pipe = quant_pipe("image")
    with cadence.accelerate(pipe, "fp8"):
        with pytest.raises(ValueError, match="already quantized by fp8"):
            cadence.accelerate(pipe, "weight-int4(group=32)")
        assert any(isinstance(m, QuantLinear) for m in pipe.transformer.modules())


def test_smoothing_without_calibration_says_how_to_calibrate():
    pipe = quant_pipe("video")
    with pytest.raises(ValueError, match="cadence calibrate --technique int8") as refused:
        cadence.accelerate(pipe, "int8")
    assert refused.value.missing_calibration == "activations"  # the store cadence tune makes on the fly
    assert not any(isinstance(m, QuantLinear) for m in pipe.transformer.modules())


def test_calibrated_smoothing_and_static_scales(kind, tmp_path):
    """The activation calibration covers every step; int8 with SmoothQuant and a static
    per-tensor scale (its max over the timesteps) runs within the int8 bound."""
    from cadence.accel.quant.calibration import calibrate, describe_calibration

    pipe = quant_pipe(kind)
    from tests.conftest import TINY_RUNS

    path = calibrate(pipe, [TINY_RUNS[kind](seed=s) for s in (1, 2)], tmp_path / "activations.json")
    import json

    data = json.loads(path.read_text())
    assert set(data["layers"]) >= set(quantizable_linears(pipe.transformer))
    assert all(len(v["step_absmax"]) == 6 for v in data["layers"].values())  # 6 steps each
    assert "across timesteps" in describe_calibration(data)
    baseline = tiny_sample(pipe, kind)
    for term in (f"int8(calibration='{path}')", f"int8(calibration='{path}', activations='static')",
                 f"fp8(calibration='{path}', smooth=0.5)", f"nvfp4(calibration='{path}', smooth=0.5, rank=4)"):
        with cadence.accelerate(pipe, term):
            quantized = tiny_sample(pipe, kind)
        assert 0 < _relative(quantized, baseline) < 0.25, term
    other = quant_pipe("image" if kind == "video" else "video")
    with pytest.raises(ValueError, match="made for another model"):
        cadence.accelerate(other, f"int8(calibration='{path}')")


def test_the_timestep_path_stays_full_precision_unless_asked():
    pipe = quant_pipe("image")  # FLUX: AdaLN modulation linears norm1.linear, norm.linear
    modulation = [n for n in quantizable_linears(pipe.transformer, "quantize") if ".norm" in n]
    assert modulation and not set(modulation) & set(quantizable_linears(pipe.transformer))
    with cadence.accelerate(pipe, "fp8(timestep_path='quantize')"):
        assert all(isinstance(pipe.transformer.get_submodule(n), QuantLinear) for n in modulation)


def test_save_then_load_gives_identical_outputs(kind, tmp_path):
    pipe = quant_pipe(kind)
    layers = len(quantizable_linears(pipe.transformer))
    with cadence.accelerate(pipe, "nvfp4(rank=4)"):
        quantized = tiny_sample(pipe, kind)
        path = checkpoint.save(pipe.transformer, tmp_path / "q.safetensors")
    with cadence.accelerate(pipe, f"nvfp4(checkpoint='{path}')") as acceleration:
        assert torch.equal(tiny_sample(pipe, kind), quantized)
        assert acceleration.stats()["quantized_layers"] == {"nvfp4": layers}
    with pytest.raises(ValueError, match="holds nvfp4.*not fp8"):
        cadence.accelerate(pipe, f"fp8(checkpoint='{path}')")
    with pytest.raises(ValueError, match="quantized from another model"):
        cadence.accelerate(quant_pipe("image" if kind == "video" else "video"), f"nvfp4(checkpoint='{path}')")
    with pytest.raises(ValueError, match="not quantized by cadence"):
        checkpoint.save(pipe.transformer, tmp_path / "none.safetensors")


def test_nan_entering_a_quantized_layer_is_reported_not_propagated():
    pipe = quant_pipe("video")
    run = dict(prompt_embeds=torch.full((1, 5, TEXT_DIM), float("nan")), negative_prompt_embeds=torch.zeros(1, 5, TEXT_DIM),
               steps=2, guidance_scale=3.0, seed=0, frames=4, height=8, width=8)
    with cadence.accelerate(pipe, "int8(smooth=0)"):
        with pytest.raises(FloatingPointError, match=r"NaN or Inf entered quantized layer\(s\) blocks.0.attn2.to_k"):
            pipe(**run)


STEP_TECHNIQUES = ["fixed-interval(interval=2)", "first-blocks(budget=0.7)", "taylorseer(interval=2)",
                   "block-delta(threshold=0.5)", "fixed-interval(interval=2, cfg_reuse=true)"]


@pytest.mark.parametrize("step", STEP_TECHNIQUES)
def test_quantization_composes_with_step_reuse(step):
    """Cache + quant: the combined error is about the sum of the two, and each applied
    alone or together restores exactly."""
    pipe = quant_pipe("video")
    baseline = tiny_sample(pipe, "video")
    errors = {}
    for recipe in (step, "fp8", f"{step} + fp8", f"fp8 + {step}"):
        with cadence.accelerate(pipe, recipe):
            errors[recipe] = _relative(tiny_sample(pipe, "video"), baseline)
    assert errors[f"{step} + fp8"] == pytest.approx(errors[f"fp8 + {step}"], rel=1e-4)
    assert errors[f"{step} + fp8"] < 1.5 * (errors[step] + errors["fp8"]) + 1e-3
    assert torch.equal(tiny_sample(pipe, "video"), baseline)


def test_every_bit_technique_is_registered_with_the_level_bit():
    bit = {name for name, t in load_builtin().items() if t.config.level == "bit"}
    assert bit == {"fp8", "int8", "weight-int8", "weight-int4", "nvfp4", "mxfp4", "mixed", "torchao-float8", "torchao-int8"}


@pytest.mark.parametrize("term", ["torchao-int8", "torchao-float8"])
def test_torchao_peer_runs_on_the_same_linears_and_restores(term, kind):
    pytest.importorskip("torchao")
    pipe = quant_pipe(kind)
    baseline = tiny_sample(pipe, kind)
    try:
        acceleration = cadence.accelerate(pipe, term)
    except ValueError as error:  # torchao's float8 needs a GPU of compute capability 8.9+
        assert "does not run on cpu" in str(error)
        assert torch.equal(tiny_sample(pipe, kind), baseline)
        return
    with acceleration:
        quantized = tiny_sample(pipe, kind)
        with pytest.raises(ValueError, match=f"already quantized by {term}"):
            cadence.accelerate(pipe, "fp8")
    assert 0 < _relative(quantized, baseline) < 0.1
    assert torch.equal(tiny_sample(pipe, kind), baseline)


def test_cli_quantize_writes_a_checkpoint_the_technique_loads(tmp_path):
    from click.testing import CliRunner

    from cadence.cli import main

    out = tmp_path / "int8.safetensors"
    result = CliRunner().invoke(main, ["quantize", "--model", "ref-image", "--recipe", "weight-int8", "--out", str(out),
                                       "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and out.is_file()
    pipe = cadence.load("ref-image", text_encoder=False)
    layers = len(quantizable_linears(pipe.transformer))
    with cadence.accelerate(pipe, f"weight-int8(checkpoint='{out}')") as acceleration:
        assert acceleration.stats()["quantized_layers"] == {"weight-int8": layers}
    bad = CliRunner().invoke(main, ["quantize", "--model", "ref-image", "--recipe", "fixed-interval", "--out", str(out)])
    assert bad.exit_code != 0 and "exactly one quantization technique" in bad.output
