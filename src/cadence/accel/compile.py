"""Regional compilation: ``torch.compile`` of the repeated transformer block.

A profile of one Wan2.1-1.3B-size forward (480p x 81, H100, bf16, eager) spends 27 % of its
time in elementwise, norm, modulation and copy kernels between the GEMMs and attention.
Compiling the block fuses them; compiling the block and not the whole transformer (as
diffusers' ``compile_repeated_blocks`` does) costs one compilation shared by every block of
a class, instead of one per block or a graph of the whole stack.

How it composes with the other levels:

- step reuse: the compiled function is the innermost forward of each block. The step
  policies' hooks wrap it and stay eager, so a reused forward, which runs no block, needs
  no graph and the per-step decisions never trigger a recompile. For that the compile hook
  must be the first hook on the blocks: ``accelerate`` applies ``compile`` before every
  other technique of its recipe, and ``apply`` refuses blocks that already carry hooks.
- attention techniques: their stand-in processor and its ``TorchFunctionMode`` are traced,
  so the whole block, attention module included (projections, QK norms, RoPE), is one graph;
  the attention call itself is the opaque custom op ``cadence::attention``, which runs
  cadence's kernels and the technique's per-call state eagerly (``accel/attention/_base.py``).
  Dense and sparse layers and steps, static and dynamic patterns, share that one graph.
- quantization: a ``QuantLinear`` traced by dynamo quantizes its activations with plain
  torch ops, which inductor fuses into the op that produces them, and runs the low-bit GEMM
  through ``torch._scaled_mm``.

No CUDA graphs: a step policy keeps a block's output across steps, and a CUDA graph
overwrites its output buffers on the next replay.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry, ModelHook

from cadence.accel.registry import Handle, TechniqueConfig, param, register
from cadence.models import adapter_for

HOOK = "cadence.compile"
MODES = ("default", "max-autotune-no-cudagraphs")
BACKENDS = ("inductor", "aot_eager", "eager")


@dataclass(frozen=True)
class CompileConfig(TechniqueConfig):
    name = "compile"
    level = "graph"
    summary = ("regional torch.compile: each transformer block's forward compiled once per block class and shared "
               "by all blocks (fuses the elementwise, norm and modulation kernels)")

    mode: str = param("default", "torch.compile mode (no CUDA graphs: step reuse keeps block outputs)", choices=MODES)
    backend: str = param("inductor", "aot_eager and eager trace without generating kernels (debugging)",
                         choices=BACKENDS)
    dynamic: bool = param(False, "one graph for every resolution (dynamic shapes) instead of one per shape")



class _CompiledForward(ModelHook):
    """The block's own forward, through the function compiled for its class."""

    def __init__(self, compiled):
        super().__init__()
        self.compiled = compiled

    def new_forward(self, module, *args, **kwargs):
        return self.compiled(module, *args, **kwargs)


def apply(model: torch.nn.Module, config: CompileConfig) -> Handle:
    blocks = adapter_for(model).blocks
    for index, block in enumerate(blocks):
        registry = getattr(block, "_diffusers_hook", None)
        if registry is not None and registry.hooks:
            raise ValueError(
                f"compile: block {index} already carries hook(s) {', '.join(registry.hooks)}; compile wraps the "
                "block's own forward and must be applied first: put it in the same recipe as the other techniques "
                "(accelerate applies it first), or remove them and apply again"
            )
    options = dict(backend=config.backend, dynamic=config.dynamic)
    if config.backend == "inductor":
        options["mode"] = config.mode
    # One compiled function per block class: dynamo caches the graph on the function's code,
    # and every block of the class passes the same guards (its parameters are graph inputs).
    compiled: dict[type, object] = {}
    for block in blocks:
        function = compiled.setdefault(type(block), torch.compile(type(block).forward, **options))
        HookRegistry.check_if_exists_or_initialize(block).register_hook(_CompiledForward(function), HOOK)

    def remove() -> None:
        for block in blocks:
            HookRegistry.check_if_exists_or_initialize(block).remove_hook(HOOK, recurse=False)

    return Handle(config, remove, lambda: {"compiled_blocks": len(blocks), "block_classes": len(compiled)})


register(CompileConfig, apply)
