"""The step-reuse engine that every caching policy runs on.

The transformer's blocks (in execution order) form a stack. ``head_blocks`` at its start
and ``tail_blocks`` at its end always run; the blocks between them are the *span*. On a
computed forward the span runs and its residual (span output minus span input, per CFG
branch) is kept. On a reused forward the first span block returns its input plus a
residual the policy provides (the cached one, a forecast, a corrected one) and the other
span blocks pass their input through, so none of them runs. The patch embedding, the
condition embedding and the output head always run (a few per cent of a forward).

A policy decides per forward, from one number: ``distance``, its estimate of how much the
span's output has changed since the last computed forward.

- threshold mode (``budget=0``): compute when the distance reaches the policy's threshold;
- budget mode (``0 < budget <= 1``): spend at most ``budget`` of the block work of the
  run, placing the computed forwards where the distance grows fastest (see ``_Pacer``).

With ``cfg_reuse`` the unconditional branch follows the conditional one: on a step whose
conditional forward was reused, the unconditional forward does not run at all; its output
is the conditional output minus the (conditional - unconditional) difference of the last
computed step.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook

from cadence.accel.registry import Handle, TechniqueConfig, param
from cadence.context import StepContext, attach_context, detach_context
from cadence.models import adapter_for


# Set on a model by cadence.parallel when several ranks share each forward's tokens
# (Ulysses / Ring): a function that averages a number over those ranks. Each rank's
# indicator reads its own slice of the tokens, and ranks that decided differently would
# wait forever on each other's collectives inside the blocks; every rank decides on the
# mean of the slices' distances instead (equal to the whole layout's for a distance
# that is a mean over tokens, close to it for a ratio of such means).
AGREE = "_cadence_agree"


@dataclass(frozen=True)
class StepPolicyConfig(TechniqueConfig):
    """Parameters every step-reuse policy shares. Subclasses add their own."""

    level = "step"

    warmup: int = param(1, "first steps always computed (the layout forms early)", low=0)
    budget: float = param(0.0, "budget mode: at most this fraction of the block work, in (0, 1]; 0 = threshold mode")
    cfg_reuse: bool = param(False, "on reused steps, skip the unconditional forward and reuse the cond-uncond "
                                   "difference")

    def validate(self):
        self.require(self.budget == 0 or 0 < self.budget <= 1,  # NaN fails both
                     f"budget={self.budget} must be in (0, 1], or 0 for threshold mode")


@dataclass
class Probe:
    """What a policy may read when it decides: the step context, the stack input, the span
    input (after the head blocks), and the modulated input of the first block."""

    context: StepContext
    stack_input: torch.Tensor
    span_input: torch.Tensor
    _modulated: Callable[[], torch.Tensor]

    def modulated_input(self) -> torch.Tensor:
        return self._modulated()


class Policy:
    """Base policy. ``distance`` is called on every forward after the first of a
    generation (the first always computes); ``computed`` after each computed forward;
    ``reuse`` gives the residual added on a reused forward."""

    head_blocks = 0
    tail_blocks = 0

    def __init__(self, config: StepPolicyConfig):
        self.config = config

    def new_state(self) -> Any:
        return None

    def distance(self, state: Any, probe: Probe, since: int) -> float:
        """Estimated change of the span output since the last computed forward, ``since``
        steps ago. Threshold mode computes when it reaches ``threshold()``."""
        return float(since)

    def threshold(self) -> float:
        raise NotImplementedError

    def must_compute(self, state: Any, probe: Probe, since: int) -> bool:
        """Hard limits of the policy (e.g. a maximum number of consecutive reuses)."""
        return False

    def computed(self, state: Any, probe: Probe, residual: torch.Tensor, encoder_residual) -> None:
        pass

    def reuse(self, state: Any, probe: Probe, residual: torch.Tensor, encoder_residual, since: int):
        """-> (residual, encoder residual) to add on a reused forward."""
        return residual, encoder_residual

    def stats(self) -> dict:
        return {}


@dataclass
class _Branch:
    policy_state: Any = None
    computing: bool = True
    span_in: torch.Tensor | None = None
    encoder_in: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    encoder_residual: torch.Tensor | None = None
    last_computed: int | None = None  # step index
    probe: Probe | None = None
    pacer: "_Pacer | None" = None
    decisions: dict[int, bool] = field(default_factory=dict)  # step -> computed


class _Pacer:
    """Budget mode. ``slots`` computed forwards may be spent over the run. With ``elapsed``
    steps since the last computed one and the span from there to the end covered by
    ``slots + 1`` intervals, compute when the distance reaches that interval times the
    distance's mean rate per step so far. For a distance that grows by one per step this
    spaces the computed steps evenly; an adaptive distance moves them to where the
    output changes fastest. The cap is hard: no slot left, no compute."""

    def __init__(self, slots: int):
        self.slots = slots
        self.closed_distance = 0.0
        self.closed_steps = 0

    def decide(self, distance: float, elapsed: int, remaining: int) -> bool:
        if self.slots <= 0:
            return False
        if self.slots >= remaining or not math.isfinite(distance):
            return True
        # The larger of the mean rate so far and the rate of the open interval: a distance
        # that speeds up (late steps often do) must not use up the slots before the end.
        rate = max((self.closed_distance + distance) / (self.closed_steps + elapsed), distance / elapsed)
        return distance >= rate * (remaining + elapsed) / (self.slots + 1) - 1e-12

    def spend(self, distance: float | None, elapsed: int) -> None:
        self.slots -= 1
        if distance is not None and math.isfinite(distance):
            self.closed_distance += distance
            self.closed_steps += elapsed


def num_steps_for_budget(context: StepContext, technique: str) -> int:
    """The run's number of steps, which budget mode cannot do without."""
    if context.num_steps is None:
        raise RuntimeError(
            f"{technique}: budget mode needs the number of denoising steps; pass the pipeline itself to "
            "cadence.accelerate (its scheduler knows them), or call the model inside "
            "transformer.cache_context(name, step_index=..., num_inference_steps=...)"
        )
    return context.num_steps


class StepReuse:
    """Installs the hooks for one policy on one transformer."""

    def __init__(self, model: torch.nn.Module, policy: Policy, hook_name: str):
        adapter = adapter_for(model)
        blocks = adapter.blocks
        config = policy.config
        if not blocks:
            raise ValueError(f"{type(model).__name__} has no transformer blocks to cache")
        head, tail = policy.head_blocks, policy.tail_blocks
        if head + tail >= len(blocks):
            raise ValueError(
                f"{config.name}: {head} head + {tail} tail blocks leave nothing to reuse in a stack of "
                f"{len(blocks)} blocks; lower them"
            )
        if config.budget and config.budget < (head + tail) / len(blocks):
            raise ValueError(
                f"{config.name}: budget={config.budget} is below the {head + tail}/{len(blocks)} of the block work "
                f"that its {head} head and {tail} tail blocks take on every forward; raise it or lower them"
            )
        self.model, self.policy, self.config, self.hook_name = model, policy, config, hook_name
        self.adapter = adapter
        self.blocks = blocks
        self.span = (head, len(blocks) - tail)  # [first, end)
        self.context = attach_context(model)
        self.context.add_generation_listener(self.reset)
        self.branches: dict[str, _Branch] = {}
        self.block_runs = 0
        self.block_slots = 0
        self.forwards = 0
        self.last_schedule: dict[str, list[int]] = {}
        for index, (block, metadata) in enumerate(zip(blocks, adapter.metadata)):
            HookRegistry.check_if_exists_or_initialize(block).register_hook(_BlockHook(self, index, metadata), hook_name)
        self.cfg = _CfgReuse(self) if config.cfg_reuse else None
        if self.cfg:
            self.context.add_interceptor(self.cfg)

    # -- per generation / per branch ---------------------------------------------------
    def reset(self) -> None:
        if self.branches:
            self.last_schedule = self.stats()["schedule"]
        self.branches.clear()
        if self.cfg:
            self.cfg.reset()

    def branch(self) -> _Branch:
        name = self.context.branch
        if name not in self.branches:
            self.branches[name] = _Branch(policy_state=self.policy.new_state())
        return self.branches[name]

    def _slots(self, num_steps: int) -> int:
        """Computed forwards the budget allows in a run of ``num_steps``, counting the
        head and tail blocks that run on every forward."""
        n = len(self.blocks)
        span = self.span[1] - self.span[0]
        slots = math.floor((self.config.budget * n - (n - span)) * num_steps / span + 1e-9)
        if slots < 1:
            smallest = ((n - span) + span / num_steps) / n
            raise ValueError(
                f"{self.config.name}: budget={self.config.budget} allows no computed forward in {num_steps} steps "
                f"(the first must compute); the smallest budget here is {smallest:.3f}"
            )
        return slots

    # -- the decision ----------------------------------------------------------------
    def decide(self, branch: _Branch, probe: Probe) -> bool:
        context, config, policy = self.context, self.config, self.policy
        step = context.step_index
        if step in branch.decisions:  # a second forward in one step (rare): keep the decision
            return branch.decisions[step]
        cached = branch.residual is not None and branch.residual.shape == probe.span_input.shape
        if cached and self.cfg and context.branch == "uncond" and self.cfg.cond_decision(step) is not None:
            return self.cfg.cond_decision(step)
        since = step - branch.last_computed if branch.last_computed is not None else None
        distance = policy.distance(branch.policy_state, probe, since) if cached else math.inf
        agree = getattr(self.model, AGREE, None)
        if cached and agree is not None:
            distance = agree(distance)
        if config.budget:
            if branch.pacer is None:
                branch.pacer = _Pacer(self._slots(num_steps_for_budget(context, config.name)))
            if not cached or step < config.warmup:
                compute = branch.pacer.slots > 0 or not cached
            else:
                compute = branch.pacer.decide(distance, since, context.num_steps - step)
            if compute:
                branch.pacer.spend(distance if cached else None, since or 0)
        elif not cached or step < config.warmup or policy.must_compute(branch.policy_state, probe, since):
            compute = True
        else:
            compute = distance >= policy.threshold()
        return compute

    # -- stats -------------------------------------------------------------------------
    def compute_fraction(self) -> float | None:
        return self.block_runs / self.block_slots if self.block_slots else None

    def stats(self) -> dict:
        """compute_fraction: block work run / block work of the unaccelerated model, over
        every forward since apply; schedule: per branch, which steps of the current (or
        last) generation computed the span."""
        schedule = {name: [int(branch.decisions[step]) for step in sorted(branch.decisions)]
                    for name, branch in self.branches.items()} or self.last_schedule
        return {"compute_fraction": self.compute_fraction(), "forwards": self.forwards, "schedule": schedule,
                **self.policy.stats()}

    def remove(self) -> None:
        for block in self.blocks:
            HookRegistry.check_if_exists_or_initialize(block).remove_hook(self.hook_name, recurse=False)
        self.context.remove_generation_listener(self.reset)
        if self.cfg:
            self.context.remove_interceptor(self.cfg)
        detach_context(self.model)
        self.branches.clear()


class _BlockHook(ModelHook):
    def __init__(self, reuse: StepReuse, index: int, metadata):
        super().__init__()
        self.reuse = reuse
        self.index = index
        self.metadata = metadata

    def _get(self, name, args, kwargs):
        return self.metadata._get_parameter_from_args_kwargs(name, args, kwargs)

    def new_forward(self, module, *args, **kwargs):
        reuse, index, metadata = self.reuse, self.index, self.metadata
        first, end = reuse.span
        hidden = self._get(metadata.hidden_states_argument_name, args, kwargs)
        encoder = None
        if metadata.return_encoder_hidden_states_index is not None:
            encoder = self._get(metadata.encoder_hidden_states_argument_name, args, kwargs)
        branch = reuse.branch()
        if index == 0:
            reuse.forwards += 1
            reuse.block_slots += len(reuse.blocks)
            adapter = reuse.adapter
            branch.probe = Probe(reuse.context, hidden, hidden,
                                 lambda: adapter.modulated_input(module, args, kwargs, hidden))
        if index == first:
            probe = branch.probe
            probe.span_input = hidden
            branch.computing = reuse.decide(branch, probe)
            step = reuse.context.step_index
            branch.decisions[step] = branch.computing
            if branch.computing:
                branch.span_in, branch.encoder_in = hidden, encoder
            else:
                since = step - branch.last_computed
                residual, encoder_residual = reuse.policy.reuse(
                    branch.policy_state, probe, branch.residual, branch.encoder_residual, since)
                hidden = hidden + residual
                if encoder is not None and encoder_residual is not None:
                    encoder = encoder + encoder_residual
                return self._pack(hidden, encoder)
        if first <= index < end and not branch.computing:
            return self._pack(hidden, encoder)

        output = self.fn_ref.original_forward(*args, **kwargs)
        reuse.block_runs += 1
        if index == end - 1:
            out_hidden, out_encoder = self._unpack(output)
            branch.residual = out_hidden - branch.span_in
            branch.encoder_residual = out_encoder - branch.encoder_in if out_encoder is not None else None
            branch.span_in = branch.encoder_in = None
            branch.last_computed = reuse.context.step_index
            reuse.policy.computed(branch.policy_state, branch.probe, branch.residual, branch.encoder_residual)
        return output

    def _unpack(self, output):
        return unpack_block_output(self.metadata, output)

    def _pack(self, hidden, encoder):
        return pack_block_output(self.metadata, hidden, encoder)


def unpack_block_output(metadata, output) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A block's output -> (hidden states, text-stream states or None), by its metadata
    (FLUX blocks return the pair as a tuple)."""
    if metadata.return_encoder_hidden_states_index is None:
        return (output[metadata.return_hidden_states_index] if isinstance(output, tuple) else output), None
    return output[metadata.return_hidden_states_index], output[metadata.return_encoder_hidden_states_index]


def pack_block_output(metadata, hidden: torch.Tensor, encoder: torch.Tensor | None):
    """The inverse of ``unpack_block_output``: what the block itself would return."""
    if metadata.return_encoder_hidden_states_index is None:
        return hidden
    output = [None, None]
    output[metadata.return_hidden_states_index] = hidden
    output[metadata.return_encoder_hidden_states_index] = encoder
    return tuple(output)


class _CfgReuse:
    """Skips the unconditional forward on steps where the conditional one was reused."""

    def __init__(self, reuse: StepReuse):
        self.reuse = reuse
        self.warned = False
        self.reset()

    def reset(self) -> None:
        self.cond_output: tuple[int, torch.Tensor] | None = None  # (step, output) of this step
        self.difference: torch.Tensor | None = None  # cond - uncond, last computed step

    def cond_decision(self, step: int) -> bool | None:
        cond = self.reuse.branches.get("cond")
        return cond.decisions.get(step) if cond is not None else None

    def before(self, context: StepContext, args, kwargs):
        if context.branch != "uncond" or self.difference is None or self.cond_output is None:
            return None
        step, output = self.cond_output
        if step != context.step_index or self.cond_decision(step) is not False:
            return None
        if self.difference.shape != _sample(output).shape:
            return None
        self.reuse.forwards += 1
        self.reuse.block_slots += len(self.reuse.blocks)
        self.reuse.branch().decisions[step] = False
        return _with_sample(output, _sample(output) - self.difference)

    def after(self, context: StepContext, output) -> None:
        if context.branch not in ("cond", "uncond") and not self.warned:
            self.warned = True  # e.g. CogVideoX's pipeline: cache context 'cond_uncond'
            warnings.warn(
                f"{self.reuse.config.name}: cfg_reuse does nothing here: the pipeline runs both CFG branches as one "
                f"batched forward ({context.branch!r}), so there is no unconditional forward to skip", stacklevel=2)
        if context.branch == "cond":
            self.cond_output = (context.step_index, output)
        elif context.branch == "uncond" and self.cond_output is not None and self.cond_output[0] == context.step_index:
            cond = _sample(self.cond_output[1])
            if cond.shape == _sample(output).shape:
                self.difference = cond - _sample(output)


def _sample(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.sample


def _with_sample(output, sample: torch.Tensor):
    if isinstance(output, tuple):
        return (sample, *output[1:])
    return dataclasses.replace(output, sample=sample)


def install(model: torch.nn.Module, policy: Policy) -> Handle:
    """Apply ``policy`` to ``model``; the handle's ``remove()`` restores it exactly."""
    reuse = StepReuse(model, policy, f"cadence.{policy.config.name}")
    return Handle(policy.config, reuse.remove, reuse.stats)
