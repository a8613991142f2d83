"""First-blocks indicator (FirstBlockCache of ParaAttention / diffusers, DBCache of
cache-dit): always run the first ``first_blocks`` blocks; compare the residual they add
with the one they added on the last computed step; when it barely changed, reuse the
remaining blocks' residual. Optionally always run the last ``last_blocks`` too, which
corrects part of the reuse error at their cost (DBCache's Bn).

The indicator costs the head blocks on every forward: with 1 of 30 blocks, 3 % of a
forward that a reused step still pays.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cadence.accel.cache._base import Policy, StepPolicyConfig, install
from cadence.accel.cache.traces import relative_l1
from cadence.accel.registry import Handle, param, register


@dataclass(frozen=True)
class FirstBlocksConfig(StepPolicyConfig):
    name = "first-blocks"
    summary = "FirstBlockCache/DBCache: run the first Fn blocks, reuse the rest when their residual barely changed"

    threshold: float = param(0.08, "relative L1 change of the head residual that triggers a compute (0 = always "
                                   "compute)", low=0)
    first_blocks: int = param(1, "Fn: blocks always run, whose residual is the indicator", low=1)
    last_blocks: int = param(0, "Bn: last blocks always run", low=0)
    max_skip: int = param(0, "compute after this many reused steps in a row (0 = no limit)", low=0)


@dataclass
class _State:
    head_residual: torch.Tensor | None = None  # of the last computed step


class FirstBlocks(Policy):
    def __init__(self, config: FirstBlocksConfig):
        super().__init__(config)
        self.head_blocks = config.first_blocks
        self.tail_blocks = config.last_blocks

    def new_state(self):
        return _State()

    def distance(self, state, probe, since):
        if state.head_residual is None:
            return float("inf")
        return relative_l1(probe.span_input - probe.stack_input, state.head_residual)

    def threshold(self):
        return self.config.threshold

    def must_compute(self, state, probe, since):
        return self.config.max_skip > 0 and since > self.config.max_skip

    def computed(self, state, probe, residual, encoder_residual):
        state.head_residual = probe.span_input - probe.stack_input


def apply(model: torch.nn.Module, config: FirstBlocksConfig) -> Handle:
    return install(model, FirstBlocks(config))


register(FirstBlocksConfig, apply)
