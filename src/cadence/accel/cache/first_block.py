"""First-blocks indicator (FirstBlockCache of ParaAttention / diffusers, DBCache of
cache-dit): always run the first ``first_blocks`` blocks; compare the residual they add
with the one they added on the last computed step; when it barely changed, reuse the
remaining blocks' residual. Optionally always run the last ``last_blocks`` too, which
corrects part of the reuse error at their cost (DBCache's Bn).

The indicator costs the head blocks on every forward: with 1 of 30 blocks, 3 % of a
forward that a reused step still pays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cadence.accel.cache._base import Policy, StepPolicyConfig, install
from cadence.accel.cache.calibration import relative_l1
from cadence.accel.registry import Handle, register


@dataclass(frozen=True)
class FirstBlocksConfig(StepPolicyConfig):
    name = "first-blocks"
    summary = "FirstBlockCache/DBCache: run the first Fn blocks, reuse the rest when their residual barely changed"

    threshold: float = field(default=0.08, metadata={
        "help": "relative L1 change of the head residual that triggers a compute (0 = always compute)"})
    first_blocks: int = field(default=1, metadata={"help": "Fn: blocks always run, whose residual is the indicator"})
    last_blocks: int = field(default=0, metadata={"help": "Bn: last blocks always run"})
    max_skip: int = field(default=0, metadata={"help": "compute after this many reused steps in a row (0 = no limit)"})

    def validate(self):
        if not self.threshold >= 0:
            raise ValueError(f"first-blocks: threshold={self.threshold} must be >= 0")
        if self.first_blocks < 1:
            raise ValueError(f"first-blocks: first_blocks={self.first_blocks} must be >= 1 (the indicator needs them)")
        if self.last_blocks < 0 or self.max_skip < 0:
            raise ValueError(
                f"first-blocks: last_blocks={self.last_blocks} and max_skip={self.max_skip} must be >= 0")


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
