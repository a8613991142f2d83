"""What every calibrated step policy (TeaCache, MagCache, ERTACache) keeps, written once.
A policy's test module imports the tests that apply to it (pytest collects them there)
and gives them its ``policy`` fixture, a :class:`Calibrated`."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
from conftest import tiny_pipe as make_pipe
from conftest import tiny_sample

import cadence
from cadence.context import get_context

STEPS = 8  # the tiny calibrations' step count
sample = functools.partial(tiny_sample, steps=STEPS)


@dataclass
class Calibrated:
    config_class: type
    files: dict  # kind -> the tiny model's calibration file
    exact: dict  # parameters under which every step is computed
    reusing: dict  # parameters under which the tiny model reuses steps

    def config(self, kind: str, **params):
        return self.config_class(calibration=str(self.files[kind]), **params)


def test_threshold_zero_is_bit_identical(policy, kind):
    pipe = make_pipe(kind)
    baseline = sample(pipe, kind)
    with cadence.accelerate(pipe, policy.config(kind, **policy.exact)) as acceleration:
        accelerated = sample(pipe, kind)
        assert acceleration.stats()["compute_fraction"] == 1.0
    assert torch.equal(baseline, accelerated)


def test_remove_restores_bit_identical_outputs(policy, kind):
    pipe = make_pipe(kind)
    baseline = sample(pipe, kind)
    acceleration = cadence.accelerate(pipe, policy.config(kind, **policy.reusing))
    accelerated = sample(pipe, kind)
    acceleration.remove()
    assert not torch.equal(baseline, accelerated)  # the technique did something
    assert torch.equal(baseline, sample(pipe, kind))
    assert get_context(pipe.transformer) is None
    for name, module in pipe.transformer.named_modules():
        hooks = getattr(module, "_diffusers_hook", None)
        assert hooks is None or not any(h.startswith("cadence") for h in hooks.hooks), name


@pytest.mark.parametrize("steps", [STEPS, 12])
def test_positive_threshold_reuses_steps_within_an_error_bound(policy, kind, steps):
    """Also at a step count other than the calibration's: the schedule is resampled."""
    pipe = make_pipe(kind)
    baseline = sample(pipe, kind, steps=steps)
    with cadence.accelerate(pipe, policy.config(kind, threshold=0.3)) as acceleration:
        accelerated = sample(pipe, kind, steps=steps)
        fraction = acceleration.stats()["compute_fraction"]
    assert 0 < fraction < 1
    relative = float((accelerated - baseline).norm() / baseline.norm())
    assert 0 < relative < 0.1
