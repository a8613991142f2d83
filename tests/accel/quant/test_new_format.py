"""The extension path for number formats, taken from outside the package: a toy weight-only
INT3 format, defined and registered here, is at once a QuantLinear mode (with smoothing,
the low-rank branch and the NaN check), accounted in memory, allocated by mixed precision
and saved to and loaded from a checkpoint."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import relative_error, seeded_randn, tiny_pipe, tiny_sample, tiny_wan, video_run

import cadence
from cadence.accel import calibration as files
from cadence.accel.quant import checkpoint, mixed
from cadence.accel.quant.formats import Format, register_format, unregister_format
from cadence.accel.quant.linear import QuantLinear


class WeightInt3(Format):
    """Toy: symmetric INT3 codes in [-3, 3] per group of input channels with an fp16 scale,
    kept one code a byte (int8): simple rather than small."""

    name = "test-weight-int3"
    bits = 3

    def group_size(self, group):
        return group

    def quantize_weight(self, weight, group):
        out_features, in_features = weight.shape
        groups = weight.reshape(out_features, in_features // group, group)
        scale = (groups.abs().amax(dim=-1, keepdim=True) / 3).clamp_min(1e-12).half()
        codes = (groups / scale.float()).round().clamp(-3, 3).to(torch.int8)
        return {"codes": codes.reshape(out_features, in_features), "scale": scale.squeeze(-1)}

    def dequantize_weight(self, layer, dtype):
        out_features, in_features = layer.codes.shape
        groups = layer.codes.reshape(out_features, layer.scale.shape[-1], -1).float()
        return (groups * layer.scale.float().unsqueeze(-1)).reshape(out_features, in_features).to(dtype)

    def stored_bytes(self, out_features, in_features, group):
        weights = out_features * in_features
        return weights + 2 * (weights // group)  # a byte a code + an fp16 scale a group


INT3 = WeightInt3()


@pytest.fixture
def registered():
    register_format(INT3)
    yield
    unregister_format(INT3.name)


def _linear(in_features=256, out_features=64, seed=0, bias=True):
    torch.manual_seed(seed)
    return torch.nn.Linear(in_features, out_features, bias=bias)


def test_the_new_format_runs_as_its_plain_pytorch_reference(registered):
    """The rule written out in plain PyTorch, apart from the class: equal up to fp32
    accumulation order; against the float layer, within INT3's error (measured 0.16)."""
    linear = _linear(seed=1)
    x = seeded_randn(3, 20, 256, seed=2)  # (B, tokens, in)
    with torch.no_grad():
        y = QuantLinear.from_linear(linear, INT3.name, group=32)(x)
        groups = linear.weight.reshape(64, 8, 32)  # (out, groups, group)
        scale = (groups.abs().amax(dim=-1, keepdim=True) / 3).half().float()
        weight = ((groups / scale).round().clamp(-3, 3) * scale).reshape(64, 256)
        reference = F.linear(x, weight, linear.bias)
        full = linear(x)
    assert y.shape == full.shape
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5)
    assert 0 < relative_error(y, full) < 0.3


def test_memory_is_accounted_as_the_format_stores_it(registered):
    linear = _linear(bias=False)
    layer = QuantLinear.from_linear(linear, INT3.name, group=32)
    expected = 64 * 256 + 2 * 64 * 256 // 32  # int8 codes + fp16 scales
    assert layer.weight_bytes == INT3.stored_bytes(64, 256, 32) == expected
    assert mixed.layer_bytes(linear, INT3.name, 32) == expected


def test_smoothing_low_rank_and_the_nan_check_come_with_the_layer(registered):
    linear = _linear(seed=3)
    with torch.no_grad():
        linear.weight += 20.0 * seeded_randn(64, 1, seed=4) @ seeded_randn(1, 256, seed=5) / 16  # a rank-one spike
        x = seeded_randn(32, 256, seed=6)
        full = linear(x)
        plain = QuantLinear.from_linear(linear, INT3.name, group=32)
        layer = QuantLinear.from_linear(linear, INT3.name, group=32, rank=4, smooth=1.0 + seeded_randn(256, seed=7).abs())
        assert relative_error(layer(x), full) < 0.7 * relative_error(plain(x), full)
        flags = torch.ones(2, dtype=torch.uint8)
        layer.monitor = flags[1:2]
        x[3, 5] = float("nan")
        layer(x)
    assert flags.tolist() == [1, 0]


def test_a_name_is_registered_once(registered):
    with pytest.raises(ValueError, match="already registered"):
        register_format(WeightInt3())


def test_mixed_precision_allocates_the_new_format_and_a_checkpoint_keeps_it(registered, tmp_path):
    """Sensitivity measured for the new format, a memory budget only part of the layers fit
    in INT3 under (all of them: 0.56 of bf16), the result saved and loaded back."""
    pipe = tiny_pipe("video", tiny_wan(attention_head_dim=16, ffn_dim=64, num_layers=2))
    errors = mixed.measure_sensitivity(pipe, [video_run(seed=1)], formats=(INT3.name,), group=16)
    path = files.save(pipe.transformer, mixed.TECHNIQUE, {"runs": 1, "steps_sampled": mixed.STEPS_SAMPLED,
                                                          "layers": errors}, tmp_path / "sensitivity.json")
    config = mixed.MixedConfig(formats=f"bf16,{INT3.name}", group=16, memory=0.75, sensitivity=str(path))
    plan = mixed.plan(pipe.transformer, config)
    chosen = [options["mode"] for options in plan.values()]
    assert set(chosen) == {"none", INT3.name}
    linears = dict(pipe.transformer.named_modules())
    used = sum(mixed.layer_bytes(linears[name], "bf16" if o["mode"] == "none" else o["mode"], 16)
               for name, o in plan.items())
    assert used <= 0.75 * sum(mixed.layer_bytes(linears[name], "bf16") for name in plan)
    baseline = tiny_sample(pipe, "video")
    with cadence.accelerate(pipe, config) as acceleration:
        assert acceleration.stats()["quantized_layers"] == {INT3.name: chosen.count(INT3.name)}
        quantized = tiny_sample(pipe, "video")
        saved = checkpoint.save(pipe.transformer, tmp_path / "int3.safetensors")
    assert 0 < relative_error(quantized, baseline) < 0.05  # measured 0.017
    with cadence.accelerate(pipe, f"mixed(checkpoint='{saved}')"):
        assert torch.equal(tiny_sample(pipe, "video"), quantized)
    assert torch.equal(tiny_sample(pipe, "video"), baseline)
