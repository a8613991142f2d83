"""``parallelize(model, config, techniques)``: one transformer spread over the ranks of a
(cfg, ring, ulysses) mesh, with the recipe's techniques already on it.

What each technique does under it, and why:

- step reuse (cadence's engine: fixed-interval, teacache, magcache, first-blocks,
  taylorseer, ertacache): each rank's indicator reads its own slice of the tokens; the
  engine averages the distance over the ranks of a forward (``cache._base.AGREE``), so
  every rank computes and reuses on the same steps. Under cfg=2 each half runs one CFG
  branch and keeps that branch's state, as one process does. Refused: block-delta and
  diffusers' hooks, which decide on each rank's slice alone (ranks would diverge and wait
  on each other forever), and cfg_reuse with cfg=2 (the uncond forward it skips already
  runs beside the cond one).
- sparse attention and attention backends: under Ulysses each rank attends over all tokens
  of its heads, so patterns see the whole layout (FLUX's interleaved [text, image] slices
  are put back in order, ``attention._base.ARRIVAL``) and low-precision kernels run on the
  rank's heads. Refused under Ring, where no rank holds the whole layout.
- quantization: weights are whole on every rank and activation scales are per token, so a
  rank computes what one process computes on its tokens.
- compile: the blocks' graphs run between diffusers' split and gather hooks; the all-to-all
  inside attention is traced into them.

With ``vae=1`` the pipeline's VAE decodes a band of the frame on each rank of the whole
world (``parallel/vae.py``); the techniques act on the transformer only and are unaffected.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from diffusers.hooks import HookRegistry, ModelHook

from cadence.accel.attention._base import ARRIVAL, AttentionConfig
from cadence.accel.cache._base import AGREE
from cadence.accel.cache.peers import PeerConfig
from cadence.accel.registry import TechniqueConfig
from cadence.context import CONTEXT_HOOK
from cadence.parallel import cfg as cfg_branches
from cadence.parallel import vae as vae_bands
from cadence.parallel.config import ParallelConfig
from cadence.parallel.mesh import build_mesh
from cadence.parallel.sequence import SequenceParallel, arrival_order, check_layout

LAYOUT_HOOK = "cadence.parallel.layout"
# Step techniques that decide on a rank's own tokens, outside the engine's agreement.
_PER_RANK = {"block-delta": "decides per block on each rank's own slice of the tokens"}


def check_techniques(config: ParallelConfig, techniques: tuple[TechniqueConfig, ...]) -> None:
    for technique in techniques:
        if config.sequence > 1:
            reason = _PER_RANK.get(technique.name)
            if reason is None and isinstance(technique, PeerConfig):
                reason = "is one of diffusers' hooks, which decide on each rank's own slice of the tokens"
            if reason:
                raise ValueError(
                    f"parallel {config}: {technique.name} {reason}, so the ranks would skip different steps; with "
                    "ulysses or ring use a cadence policy (fixed-interval, teacache, magcache, first-blocks, "
                    "taylorseer, ertacache), or cfg=2 alone")
        if config.ring > 1 and isinstance(technique, AttentionConfig):
            raise ValueError(
                f"parallel {config}: {technique.name} needs the whole token layout of each head, which no rank holds "
                "under ring attention; valid: attention techniques with ulysses (ring=1), or ring without one")
        if config.cfg > 1 and getattr(technique, "cfg_reuse", False):
            raise ValueError(
                f"parallel {config}: {technique.name}(cfg_reuse=true) skips the unconditional forward, which cfg=2 "
                "already runs beside the conditional one on other ranks; drop cfg_reuse or use cfg=1")


class _LayoutCheck(ModelHook):
    """Refuses, before any collective, a size whose tokens do not split evenly."""

    def __init__(self, sequence: SequenceParallel):
        super().__init__()
        self.sequence = sequence

    def pre_forward(self, module, *args, **kwargs):
        check_layout(self.sequence.layout(args, kwargs), self.sequence.config)
        return args, kwargs


def _reregister_last(model: torch.nn.Module, name: str) -> None:
    """Move a hook of the model to the outside of its chain (diffusers' registry calls the
    last registered hook first)."""
    registry = HookRegistry.check_if_exists_or_initialize(model)
    hook = registry.get_hook(name)
    if hook is not None:
        registry.remove_hook(name, recurse=False)
        registry.register_hook(hook, name)


class Parallel:
    """The handle of one parallel application; ``remove()`` gives back the one-process model."""

    def __init__(self, model: torch.nn.Module, config: ParallelConfig, techniques=(), vae=None):
        check_techniques(config, tuple(techniques))
        if config.vae:  # before any collective: every rank refuses alike
            vae_bands.check(vae, config.vae_halo)
        self.model, self.config = model, config
        self.device = next(model.parameters()).device
        self.mesh = build_mesh(config, self.device)
        self.sequence = self.cfg = self.vae = None
        try:
            self._apply(model, config)
            if config.vae:
                self.vae = vae_bands.apply(vae, halo=config.vae_halo)  # None on one process: nothing to split
        except Exception:
            self.remove()
            raise

    def _apply(self, model: torch.nn.Module, config: ParallelConfig) -> None:
        registry = HookRegistry.check_if_exists_or_initialize(model)
        if config.sequence > 1:
            self.sequence = SequenceParallel(model, config, self.mesh, self.device)
            registry.register_hook(_LayoutCheck(self.sequence), LAYOUT_HOOK)
            # The step context reads the layout and the branch off the whole forward's
            # arguments, before diffusers' hook splits them.
            _reregister_last(model, CONTEXT_HOOK)
            setattr(model, AGREE, self._agree)
            if config.ulysses > 1:
                arrivals: dict = {}
                setattr(model, ARRIVAL, lambda layout: arrivals.setdefault(layout, arrival_order(layout, config.ulysses)))
        if config.cfg > 1:
            coordinate = self.mesh.get_coordinate()[0]
            self.cfg = cfg_branches.install(model, cfg_branches.BRANCHES[coordinate], self.mesh["cfg"].get_group())

    def _agree(self, value: float) -> float:
        """The mean of ``value`` over the ranks that share this forward's tokens."""
        device = self.device if dist.get_backend(self.sequence.group) != "gloo" else torch.device("cpu")
        total = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(total, group=self.sequence.group)
        return float(total) / self.config.sequence

    def stats(self) -> dict:
        return {"parallel": str(self.config)}

    def remove(self) -> None:
        model = self.model
        registry = HookRegistry.check_if_exists_or_initialize(model)
        if self.vae is not None:
            self.vae.remove()
            self.vae = None
        if self.cfg is not None:
            cfg_branches.remove(model)
            self.cfg = None
        if self.sequence is not None:
            # diffusers' registry unhooks correctly from the outside in: take the context
            # hook off, undo the split hooks, then put it back where it was.
            context = registry.get_hook(CONTEXT_HOOK)
            if context is not None:
                registry.remove_hook(CONTEXT_HOOK, recurse=False)
            registry.remove_hook(LAYOUT_HOOK, recurse=False)
            self.sequence.remove()
            if context is not None:
                registry.register_hook(context, CONTEXT_HOOK)
            for name in (AGREE, ARRIVAL):
                if hasattr(model, name):
                    delattr(model, name)
            self.sequence = None


def parallelize(model: torch.nn.Module, config: ParallelConfig, techniques=(), vae=None) -> Parallel:
    """``vae``: the pipeline's VAE, needed (and only read) with ``config.vae``."""
    return Parallel(model, config, techniques, vae)
