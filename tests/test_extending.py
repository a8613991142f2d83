"""The extension paths CONTRIBUTING.md shows, taken from outside the package: a new step
policy and a new sparse pattern, each one file that registers itself, work at once in a
recipe string, in `cadence recipes`, in `accelerate` and in `remove()`. (A new number
format: tests/accel/quant/test_new_format.py; a new model family: tests/models/test_new_family.py.)"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from click.testing import CliRunner

import cadence
from cadence.accel.attention._base import SparseAttentionConfig, install as install_attention
from cadence.accel.cache._base import Policy, StepPolicyConfig, install as install_policy
from cadence.accel.registry import param, register, unregister
from cadence.cli import main


# -- a new step policy: compute the first half of the steps, then every third -----------
@dataclass(frozen=True)
class HalfThenThirdsConfig(StepPolicyConfig):
    name = "test-half-then-thirds"
    summary = "test policy: every step in the first half, then every third step"

    stride: int = param(3, "compute every N-th step of the second half", low=1)


class HalfThenThirds(Policy):
    def distance(self, state, probe, since):
        step, steps = probe.context.step_index, probe.context.num_steps
        return 1.0 if step < steps // 2 or (step - steps // 2) % self.config.stride == 0 else 0.0

    def threshold(self):
        return 1.0


# -- a new sparse pattern: a band of blocks around the diagonal -------------------------
@dataclass(frozen=True)
class BandConfig(SparseAttentionConfig):
    name = "test-band"
    summary = "test pattern: each query block keeps the key blocks nearest along the block sequence"

    def pattern(self, geometry, density, query, key, scale):
        blocks = geometry.pattern_blocks
        index = torch.arange(blocks)
        width = max(0, round(density * blocks) // 2)
        mask = (index[:, None] - index[None, :]).abs() <= width  # (blocks, blocks)
        return mask[None, None].to(query.device), None


@pytest.fixture
def registered():
    register(HalfThenThirdsConfig, lambda model, config: install_policy(model, HalfThenThirds(config)))
    register(BandConfig, install_attention)
    yield
    unregister(HalfThenThirdsConfig.name)
    unregister(BandConfig.name)


def test_a_new_step_policy_runs_from_a_recipe_string_and_restores(registered, video_pipe, generate):
    baseline = generate(video_pipe, steps=12)
    with cadence.accelerate(video_pipe, "test-half-then-thirds(stride=3, warmup=0)") as acceleration:
        accelerated = generate(video_pipe, steps=12)
        stats = acceleration.stats()
    # steps 0-5 computed, then 6 and 9: 8 of 12
    assert stats["compute_fraction"] == pytest.approx(8 / 12)
    assert not torch.equal(baseline, accelerated)
    assert torch.equal(baseline, generate(video_pipe, steps=12))


def test_a_new_sparse_pattern_composes_with_a_step_policy_and_restores(registered, video_pipe, generate):
    baseline = generate(video_pipe)
    recipe = "test-band(density=0.25, block=16, dense_fraction=0) + test-half-then-thirds"
    with cadence.accelerate(video_pipe, recipe) as acceleration:
        accelerated = generate(video_pipe)
        stats = acceleration.stats()
    assert 0 < stats["density"] < 1 and stats["compute_fraction"] < 1
    assert not torch.equal(baseline, accelerated)
    assert torch.equal(baseline, generate(video_pipe))


def test_new_techniques_are_listed_and_validated_like_the_builtin_ones(registered):
    listing = CliRunner().invoke(main, ["recipes"]).output
    assert "test-half-then-thirds  [step]" in listing and "test-band  [token]" in listing
    assert "stride: int = 3    compute every N-th step of the second half (>= 1)" in listing
    with pytest.raises(ValueError, match=r"test-half-then-thirds: stride=0 must be >= 1"):
        HalfThenThirdsConfig(stride=0)
    with pytest.raises(ValueError, match=r"test-band: density=0.0 must be in \(0, 1\]"):
        cadence.Recipe.parse("test-band(density=0)")


def test_a_technique_at_an_unknown_level_is_refused():
    @dataclass(frozen=True)
    class Elsewhere(StepPolicyConfig):
        name = "test-elsewhere"
        level = "vae"
        summary = "nothing"

    with pytest.raises(ValueError, match="level='vae'; valid: graph, bit, token, step"):
        register(Elsewhere, lambda model, config: None)
