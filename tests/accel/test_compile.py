"""Regional compilation: one graph per block class, shared by every block and step, composed
with step reuse, sparse attention and quantization, and removed exactly. Most tests trace
with backend='aot_eager' (dynamo and AOTAutograd without code generation: the same graphs,
bit-identical numerics, no C++ compile on the CPU); one runs inductor."""

import pytest
import torch
from conftest import tiny_pipe, tiny_sample, video_run
from torch._dynamo.utils import counters

import cadence
from cadence.models import adapter_for
from cadence.recipe import Recipe, apply_order

pytestmark = pytest.mark.filterwarnings("ignore:.*reference path runs")
TRACE = "compile(backend='aot_eager')"


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture
def fresh_dynamo():
    """Graph counts from zero: no graph compiled by an earlier test."""
    torch._dynamo.reset()
    counters.clear()


@pytest.mark.parametrize("recipe", [
    "", "fixed-interval(interval=2, cfg_reuse=true)", "sparse-window(density=0.5)", "int8(smooth=0)",
    "taylorseer(order=2, budget=0.5) + sparse-window(density=0.5) + int8(smooth=0)",
])
def test_compiled_recipe_gives_the_eager_output_and_remove_restores(recipe, kind):
    """Traced graphs, same numerics: the compiled recipe equals the recipe run eagerly."""
    pipe = tiny_pipe(kind)
    baseline = tiny_sample(pipe, kind)
    with cadence.accelerate(pipe, recipe or "baseline"):
        eager = tiny_sample(pipe, kind)
    with cadence.accelerate(pipe, f"{recipe} + {TRACE}" if recipe else TRACE) as acceleration:
        compiled = tiny_sample(pipe, kind)
        assert acceleration.stats()["compiled_blocks"] == len(adapter_for(pipe.transformer).blocks)
    assert torch.equal(compiled, eager)
    assert not _block_hooks(pipe.transformer)
    assert torch.equal(tiny_sample(pipe, kind), baseline)


def _block_hooks(model) -> list[str]:
    return [name for block in adapter_for(model).blocks
            for name in getattr(getattr(block, "_diffusers_hook", None), "hooks", {})]


def test_one_graph_for_every_block_and_step_no_recompiles(fresh_dynamo):
    """Every block of a class shares one compiled graph (the quantized layers too: no
    per-layer constant in them), and new steps, seeds and step-reuse decisions add none."""
    pipe = tiny_pipe("video")
    with cadence.accelerate(pipe, f"first-blocks(budget=0.5) + int8(smooth=0) + {TRACE}"):
        pipe(**video_run(steps=6, seed=0))
        first = _graphs()
        pipe(**video_run(steps=9, seed=1))
    assert first == 1
    assert _graphs() == first
    assert "recompiles" not in counters or not counters["recompiles"]


@pytest.mark.parametrize("attention", [
    "sparse-window(density=0.5, dense_layers=1)", "sparse-topk(density=0.5)", "sparse-router(density=0.5)",
    "attention-backend(backend='sage')", "attention-backend(backend='math')",
])
def test_attention_technique_compiles_inside_one_graph_per_block_class(attention, fresh_dynamo):
    """The attention call is an opaque op inside the block's graph: one graph for every
    block, layer and step, dense steps and dense layers included, and no recompiles; the
    layer index reaches the technique (dense_layers counts as it does eagerly)."""
    pipe = tiny_pipe("video")
    runs = [video_run(steps=6, seed=0), video_run(steps=9, seed=1)]
    with cadence.accelerate(pipe, attention) as acceleration:
        for run in runs:
            pipe(**run)
        eager = acceleration.stats()
    with cadence.accelerate(pipe, f"{attention} + {TRACE}") as acceleration:
        pipe(**runs[0])
        first = _graphs()
        pipe(**runs[1])
        compiled = acceleration.stats()
    assert first == 1 and _graphs() == first
    assert "recompiles" not in counters or not counters["recompiles"]
    assert "graph_break" not in counters or not counters["graph_break"]
    calls = ("sparse_calls", "dense_calls")
    assert [compiled[key] for key in calls] == [eager[key] for key in calls]
    assert compiled["dense_calls"] + compiled["sparse_calls"] == 3 * 2 * (6 + 9)  # 3 blocks, CFG, 15 steps


@pytest.mark.parametrize("attention", ["", "sparse-window(density=0.5, dense_fraction=0)"])
def test_inductor_matches_eager_within_float32_rounding(attention):
    """With an attention technique too: inductor lays out the custom op's output as its
    fake kernel says (a wrong layout fails an inductor stride assertion at run time)."""
    pipe = tiny_pipe("video")
    with cadence.accelerate(pipe, attention or "baseline"):
        eager = pipe(**video_run(steps=3)).frames
    with cadence.accelerate(pipe, f"{attention} + compile" if attention else "compile"):
        compiled = pipe(**video_run(steps=3)).frames
    assert (compiled - eager).abs().max() < 1e-4  # fused kernels reorder float32 sums (measured 2.4e-7)


def test_compile_is_applied_first_whatever_the_written_order():
    recipe = Recipe.parse(f"magcache(budget=0.4) + sparse-window + int8 + {TRACE}")
    assert [t.level for t in apply_order(recipe)] == ["graph", "bit", "token", "step"]
    assert str(recipe).endswith("compile(backend='aot_eager')")  # the recipe itself keeps its order


def test_compile_after_another_acceleration_of_the_blocks_is_refused():
    pipe = tiny_pipe("video")
    with cadence.accelerate(pipe, "fixed-interval(interval=2)"):
        with pytest.raises(ValueError, match="must be applied first.*same recipe"):
            cadence.accelerate(pipe, TRACE)
    assert not _block_hooks(pipe.transformer)


@pytest.mark.parametrize("text, message", [
    ("compile(mode='reduce-overhead')", "mode='reduce-overhead'; valid: default, max-autotune-no-cudagraphs"),
    ("compile(backend='tvm')", "backend='tvm'; valid: inductor, aot_eager, eager"),
    ("compile + compile(mode='max-autotune-no-cudagraphs')", "one compilation, got 2"),
    ("compile + diffusers-pab", "compile cannot hold diffusers-pab: its hooks sit on modules inside the blocks"),
    ("diffusers-taylorseer + compile", "compile cannot hold diffusers-taylorseer"),
])
def test_bad_configuration_is_refused_with_the_valid_values(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Recipe.parse(text)


def test_nan_check_still_fires_in_a_compiled_block():
    pipe = tiny_pipe("video")
    run = video_run(steps=2)
    run["prompt_embeds"] = run["prompt_embeds"].clone()
    run["prompt_embeds"][0, 0, 0] = float("nan")
    with cadence.accelerate(pipe, f"int8(smooth=0) + {TRACE}"):
        with pytest.raises(FloatingPointError, match="NaN or Inf entered quantized layer"):
            pipe(**run)
