"""The decoding plan: which dLLM recipe terms a model holds, and where decoding is now.

A dLLM recipe term (a policy that decides which masked tokens to commit, the
semi-autoregressive block length, a KV cache) is a registered technique at the ``sequence``
level: ``cadence.accelerate(model, "semi-ar(block_length=32) + parallel(threshold=0.9) +
dual-cache")`` installs each term in the model's plan, and the decoding loop
(:mod:`cadence.dllm.engine`) reads the plan. ``handle.remove()`` takes the term out again;
with every handle removed the model has no plan and no hook, and decodes exactly as before.

The plan also carries the decoding position (the generation, the block index and its window
of canvas positions), which the engine writes and the caches read: the one context object of
the design, for diffusion LLMs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cadence.accel.registry import Handle, TechniqueConfig

PLAN = "_cadence_dllm_plan"
# What a plan holds one of: a second term of a role is refused, as a recipe holds one
# step-reuse policy. "commit" decides which masked tokens a step fills; "blocks" the
# semi-autoregressive block length; "cache" the KV reuse; "stop" when a row is finished;
# "sparse" which of the prompt's key blocks attention reads.
ROLES = {"commit": "decoding policy", "blocks": "block schedule", "cache": "KV cache", "stop": "stopping rule",
         "edit": "token-editing rule", "sparse": "prompt attention sparsity"}


@dataclass
class DecodingPlan:
    terms: dict[str, TechniqueConfig] = field(default_factory=dict)
    generation: int = 0  # counts engine generations: a cache refreshes when it changes
    block_index: int = -1
    window: tuple[int, int] | None = None  # canvas positions of the block being decoded; None outside the engine


def plan_of(model) -> DecodingPlan | None:
    return getattr(model, PLAN, None)


def install_term(model, role: str, config: TechniqueConfig, on_remove=None, stats=None) -> Handle:
    """Put ``config`` in the model's plan under ``role``; the handle takes it out (and runs
    ``on_remove``, which undoes whatever else the term installed)."""
    if role not in ROLES:
        raise ValueError(f"unknown dLLM role {role!r}; valid: {', '.join(ROLES)}")
    plan = plan_of(model)
    if plan is None:
        plan = DecodingPlan()
        setattr(model, PLAN, plan)
    held = plan.terms.get(role)
    if held is not None:
        raise ValueError(f"cannot apply {config}: the model already has a {ROLES[role]}, {held}; a dLLM recipe holds "
                         f"one {ROLES[role]}: remove() it first, or choose one")
    for installed in plan.terms.values():  # a term that cannot be sound beside another says why
        for term, other in ((installed, config), (config, installed)):
            if hasattr(term, "check_composes"):
                term.check_composes(other)
    plan.terms[role] = config

    def remove():
        if on_remove is not None:
            on_remove()
        del plan.terms[role]
        if not plan.terms and getattr(model, PLAN, None) is plan:
            delattr(model, PLAN)

    return Handle(config, remove, stats)
