"""Block-wise temporal delta cache: each transformer block, in each CFG branch, is skipped
on its own while its input has barely moved since it last ran; it then returns its input
plus the delta (output - input) it produced when it last ran.

The temporal delta cache of 6Bit-Diffusion and the block-wise adaptive caching of BWCache
share this shape: a per-block cache of the block's contribution, refreshed when an
indicator of the block's input change says it went stale. The rules here are cadence's:

- indicator: ``mean|x - x_ran| / mean|x_ran|``, the relative L1 change of the block's input
  hidden states since the block last ran (x_ran: its input then). Not accumulated over
  steps: the cached delta was computed at ``x_ran``, so the distance to ``x_ran`` is what
  makes it stale, and it is measured directly; a sum of step-to-step changes only bounds
  it from above (triangle inequality) and would refresh early when the input wanders and
  comes back. The text stream of FLUX blocks is not part of it: it enters the first block
  unchanged on every step.
- threshold mode (``budget=0``): a block runs when its indicator reaches ``threshold``,
  when it has not run for ``max_age`` steps, on the first ``warmup`` steps, and when it
  has no delta for this input's shape yet.
- budget mode (``0 < budget <= 1``): per branch, at most ``floor(budget * steps * blocks)``
  block runs over the run (a hard cap; the first forward runs every block, so the budget
  must allow at least one full forward). Each block j keeps the rate ``rho_j`` at which
  its indicator grows per step, from its latest measurement (indicator / steps since the
  block ran). The recent rate, not the mean over the run: the first steps move several
  times faster than the middle ones, so the run mean holds the level too high mid-run and
  leaves the slots to the last steps (ref-image, 5 held-out prompts, 20 steps, budgets
  0.4/0.5/0.6: mean relative error 0.30/0.26/0.26 with the run mean, 0.26/0.26/0.22 with
  the recent rate). If every block ran whenever its indicator
  reached a common level ``tau``, block j would run ``R * rho_j / tau`` times in the ``R``
  steps left; spending exactly the slots left gives ``tau = R * sum_j rho_j / slots_left``.
  A block runs when its indicator reaches that ``tau``, so the budget goes to the blocks
  whose input moves fastest and to the steps where it does (blocks not yet measured
  count at the mean rate of those that were). Warmup steps run while slots are left;
  ``max_age`` does not apply (the pacer decides alone, as in the step engine's budget
  mode): forcing refreshes the pacer did not plan leaves slots unspent.

``cfg_reuse`` is refused: it skips whole unconditional forwards, which this per-block
cache cannot decide. The policy hooks the same blocks as the step policies, so its level
is "step" and a recipe holds it or one of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry, ModelHook

from cadence.accel.cache._base import (
    StepPolicyConfig,
    num_steps_for_budget,
    pack_block_output,
    unpack_block_output,
)
from cadence.accel.cache.traces import relative_l1
from cadence.accel.registry import Handle, param, register
from cadence.context import attach_context, detach_context
from cadence.models import adapter_for

TECHNIQUE = "block-delta"


@dataclass(frozen=True)
class BlockDeltaConfig(StepPolicyConfig):
    name = TECHNIQUE
    summary = ("block-wise temporal delta cache: each block reuses its last (output - input) while its own input "
               "has barely changed since it ran")

    # 0.1: mid-run, block inputs of the reference models move by a few per cent a step, so a
    # smaller threshold reuses nothing (benchmarks/RESULTS.md, "Default thresholds")
    threshold: float = param(0.1, "reuse a block while the relative L1 change of its input since it ran stays below "
                                  "this (0 = never)", low=0)
    max_age: int = param(4, "a block runs at least every N steps", low=1)

    def validate(self):
        self.require(not self.cfg_reuse, "cfg_reuse=true is not supported (it skips whole forwards; this cache "
                                         "decides per block); use a step policy such as fixed-interval for it")


INDICATOR_TOKENS = 4096  # the indicator reads at most about this many tokens, evenly strided


def indicator_sample(hidden: torch.Tensor) -> torch.Tensor:
    """The tokens the indicator compares: all of them up to INDICATOR_TOKENS, else every
    k-th. At the Wan2.1-1.3B size (32,760 tokens) keeping each block's whole input cost
    gigabytes and the full comparison a visible share of the ideal speedup
    (benchmarks/RESULTS.md, "Caching policies at real size")."""
    stride = max(1, hidden.shape[1] // INDICATOR_TOKENS)
    return hidden.detach() if stride == 1 else hidden.detach()[:, ::stride].clone()


@dataclass
class _Block:
    """One block's cache in one CFG branch."""

    input: torch.Tensor | None = None  # indicator sample of the hidden states the block last ran on
    input_shape: torch.Size | None = None
    encoder_shape: torch.Size | None = None  # of the text stream then (FLUX)
    delta: torch.Tensor | None = None  # output - input, then
    encoder_delta: torch.Tensor | None = None
    last_run: int = -1  # step
    indicator: float | None = None  # measured on this forward
    rate: float | None = None  # budget mode: indicator / steps since the block ran, at its latest measurement


@dataclass
class _Branch:
    blocks: list[_Block]
    slots: int | None = None  # budget mode: block runs left in this run


class BlockDelta:
    """Installs one delta hook per block of one transformer."""

    def __init__(self, model: torch.nn.Module, config: BlockDeltaConfig):
        adapter = adapter_for(model)
        if not adapter.blocks:
            raise ValueError(f"{type(model).__name__} has no transformer blocks to cache")
        self.model, self.config, self.blocks, self.metadata = model, config, adapter.blocks, adapter.metadata
        self.hook_name = f"cadence.{TECHNIQUE}"
        self.context = attach_context(model)
        self.context.add_generation_listener(self.reset)
        self.branches: dict[str, _Branch] = {}
        self.forwards = 0
        self.block_runs = [0] * len(self.blocks)
        for index, (block, metadata) in enumerate(zip(self.blocks, adapter.metadata)):
            registry = HookRegistry.check_if_exists_or_initialize(block)
            registry.register_hook(_DeltaHook(self, index, metadata), self.hook_name)

    def reset(self) -> None:
        self.branches.clear()

    def branch(self) -> _Branch:
        name = self.context.branch
        if name not in self.branches:
            self.branches[name] = _Branch([_Block() for _ in self.blocks])
        return self.branches[name]

    def decide(self, branch: _Branch, index: int, hidden: torch.Tensor, encoder: torch.Tensor | None) -> bool:
        """Run block ``index`` on this forward?"""
        config, step = self.config, self.context.step_index
        block = branch.blocks[index]
        block.indicator = None
        cached = (block.input is not None and block.input_shape == hidden.shape
                  and (encoder is None or block.encoder_shape == encoder.shape))
        if not cached:
            return True  # nothing to reuse (budget mode: the cap is checked to allow a full forward)
        elapsed = step - block.last_run
        if not config.budget:
            if step < config.warmup or elapsed >= config.max_age:
                return True
            block.indicator = relative_l1(indicator_sample(hidden), block.input)
            return not block.indicator < config.threshold
        block.indicator = relative_l1(indicator_sample(hidden), block.input)
        return self._paced(branch, index, block.indicator, elapsed)

    def _paced(self, branch: _Branch, index: int, indicator: float, elapsed: int) -> bool:
        if branch.slots <= 0:
            return False
        block = branch.blocks[index]
        step, blocks = self.context.step_index, len(self.blocks)
        remaining = self.context.num_steps - step  # steps left, this one included
        if step < self.config.warmup or branch.slots >= remaining * blocks - index:  # slots for every block left
            return True
        if elapsed > 0:
            block.rate = indicator / elapsed
        known = [b.rate for b in branch.blocks if b.rate is not None]
        total_rate = sum(known) * len(self.blocks) / len(known)  # unmeasured blocks at the mean rate
        return indicator >= remaining * total_rate / branch.slots - 1e-12

    def ran(self, branch: _Branch, index: int, hidden, encoder, output) -> None:
        block = branch.blocks[index]
        step = self.context.step_index
        block.indicator = None
        out_hidden, out_encoder = unpack_block_output(self.metadata[index], output)
        block.input, block.input_shape, block.delta = indicator_sample(hidden), hidden.shape, out_hidden - hidden
        if encoder is not None and out_encoder is not None:
            block.encoder_shape, block.encoder_delta = encoder.shape, out_encoder - encoder
        block.last_run = step
        self.block_runs[index] += 1
        if branch.slots is not None:
            branch.slots -= 1

    def start_forward(self, branch: _Branch) -> None:
        self.forwards += 1
        config = self.config
        if not config.budget or branch.slots is not None:
            return
        steps = num_steps_for_budget(self.context, TECHNIQUE)
        branch.slots = math.floor(config.budget * steps * len(self.blocks) + 1e-9)
        if branch.slots < len(self.blocks):
            raise ValueError(
                f"block-delta: budget={config.budget} allows {branch.slots} block runs in {steps} steps, fewer than "
                f"the first forward's {len(self.blocks)}; raise it to at least {1 / steps:.3g}"
            )

    # -- stats and removal ---------------------------------------------------------------
    def stats(self) -> dict:
        slots = len(self.blocks) * self.forwards
        return {
            "compute_fraction": sum(self.block_runs) / slots if slots else None,
            "forwards": self.forwards,
            "block_compute_fraction": [runs / self.forwards for runs in self.block_runs] if self.forwards else None,
        }

    def remove(self) -> None:
        for block in self.blocks:
            HookRegistry.check_if_exists_or_initialize(block).remove_hook(self.hook_name, recurse=False)
        self.context.remove_generation_listener(self.reset)
        detach_context(self.model)
        self.branches.clear()


class _DeltaHook(ModelHook):
    def __init__(self, cache: BlockDelta, index: int, metadata):
        super().__init__()
        self.cache, self.index, self.metadata = cache, index, metadata

    def new_forward(self, module, *args, **kwargs):
        cache, metadata = self.cache, self.metadata
        get = metadata._get_parameter_from_args_kwargs
        hidden = get(metadata.hidden_states_argument_name, args, kwargs)
        encoder = None
        if metadata.return_encoder_hidden_states_index is not None:
            encoder = get(metadata.encoder_hidden_states_argument_name, args, kwargs)
        branch = cache.branch()
        if self.index == 0:
            cache.start_forward(branch)
        if cache.decide(branch, self.index, hidden, encoder):
            output = self.fn_ref.original_forward(*args, **kwargs)
            cache.ran(branch, self.index, hidden, encoder, output)
            return output
        block = branch.blocks[self.index]
        if encoder is not None and block.encoder_delta is not None:
            encoder = encoder + block.encoder_delta
        return pack_block_output(metadata, hidden + block.delta, encoder)


def apply(model: torch.nn.Module, config: BlockDeltaConfig) -> Handle:
    cache = BlockDelta(model, config)
    return Handle(config, cache.remove, cache.stats)


register(BlockDeltaConfig, apply)

__all__ = ["BlockDeltaConfig", "apply"]
