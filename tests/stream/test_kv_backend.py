"""The token level's attention-backend term inside the streaming KV cache: the cache's call over
[cache, chunk] runs the term's backend (SageAttention on cadence's Triton kernel, which Triton's
interpreter runs on the CPU at these tiny sizes: the root conftest sets TRITON_INTERPRET=1), in
either order of application, removed exactly in either order; sparse token patterns stay refused."""

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import TEXT_DIM, seeded_randn, text, tiny_wan
from diffusers import FlowMatchEulerDiscreteScheduler

import cadence
from cadence.accel.attention import _sage_triton, kernels
from cadence.accel.attention.backend import AttentionBackendConfig
from cadence.accel.attention.backend import apply as apply_backend
from cadence.accel.attention.window import WindowConfig as SparseWindowConfig
from cadence.accel.attention.window import apply as apply_sparse_window
from cadence.accel.sequence import WindowConfig
from cadence.accel.sequence._base import KV_CACHE, apply_policy
from cadence.reference.pipelines import RefVideoPipeline
from cadence.stream import stream
from cadence.stream.cli import stream as stream_command

pytest.importorskip("triton")

SIZE = {"height": 8, "width": 8}  # 4 x 4 patches of 2 x 2: 16 tokens a frame
# Two chunks of two frames, one step each: 32 query tokens (one tile of the interpreter's 32),
# 32 then 64 keys. The kernel under Triton's interpreter takes about 0.3 s a call.
CALL = {"chunks": 2, "frames_per_chunk": 2, "steps_per_chunk": 1, "decode": False, **SIZE}
# The kernel's stated error against exact float32 attention on random inputs
# (tests/accel/attention/test_sage_kernel.py, test_reference_is_close_to_exact_attention).
SAGE_ERROR = {"sage": 0.06, "sage-fp8": 0.08}
SAGE_COSINE = 0.997


def _model():
    return tiny_wan(attention_head_dim=64, num_layers=2)  # the kernel takes head dims 64 and 128


def _latents(model, **call) -> list[torch.Tensor]:
    return [chunk.latents for chunk in stream(model, text(), policy=WindowConfig(frames=4), **{**CALL, **call})]


def _forward(model, x) -> torch.Tensor:
    with torch.no_grad():
        (output,) = model(
            hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text(), return_dict=False
        )
    return output


def _relative(out, expected) -> float:
    return float((out - expected).norm() / expected.norm())


def _counting(monkeypatch, module, name) -> list[tuple]:
    """Record the (query, key) token counts of every call to ``module.name``, which still runs."""
    calls, original = [], getattr(module, name)

    def counted(query, key, *args, **kwargs):
        calls.append((query.shape[-2], key.shape[-2]))
        return original(query, key, *args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def _processors(model) -> list:
    return [block.attn1.processor for block in model.blocks]


# -- the kernel inside the cache ------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sage", "sage-fp8"])
def test_a_sage_stream_runs_the_kernel_on_cache_and_chunk_within_its_stated_error(backend, monkeypatch):
    model = _model()
    native = _latents(model)
    kernel = _counting(monkeypatch, _sage_triton, "sage_attention")
    handle = apply_backend(model, AttentionBackendConfig(backend=backend))
    sage = _latents(model)
    handle.remove()
    # chunk 0: its step and its write pass read no cache (32 keys); chunk 1's step reads 2 cached frames
    # (64 keys); the last chunk is not written. Two layers each.
    assert kernel == [(32, 32)] * 4 + [(32, 64)] * 2
    for out, expected in zip(sage, native):
        assert 0 < _relative(out, expected) < SAGE_ERROR[backend]
        assert F.cosine_similarity(out.flatten(), expected.flatten(), dim=0) > SAGE_COSINE


def test_a_cached_forward_on_sage_is_within_the_kernels_stated_error_of_the_native_one():
    """The model's output itself (not the latents, which the noise dominates) on a chunk that reads
    a cached one, under the bound the kernel states for one attention call."""
    model = _model()
    outputs = {}
    for backend in ("native", "sage"):
        handles = [apply_policy(model, WindowConfig(frames=4))]
        if backend != "native":
            handles.append(apply_backend(model, AttentionBackendConfig(backend=backend)))
        cache = getattr(model, KV_CACHE)
        cache.set_mode("write")
        _forward(model, seeded_randn(1, 3, 2, 8, 8, seed=1))
        cache.commit()
        outputs[backend] = _forward(model, seeded_randn(1, 3, 2, 8, 8, seed=2))
        for handle in reversed(handles):
            handle.remove()
    assert 0 < _relative(outputs["sage"], outputs["native"]) < SAGE_ERROR["sage"]


@pytest.mark.parametrize("backend, exact", [("auto", True), ("math", False), ("flex", False)])
def test_exact_backends_keep_the_native_stream(backend, exact, monkeypatch):
    """'auto' is the model's own SDPA call: bit for bit; math and FlexAttention compute the same
    softmax in another order (float32 rounding). Each runs through the term's dense path."""
    model = _model()
    native = _latents(model)
    dense = _counting(monkeypatch, kernels, "dense")
    handle = apply_backend(model, AttentionBackendConfig(backend=backend))
    streamed = _latents(model)
    handle.remove()
    assert dense == [(32, 32)] * 4 + [(32, 64)] * 2
    for out, expected in zip(streamed, native):
        if exact:
            assert torch.equal(out, expected)
        else:
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_compiled_blocks_run_the_backend_inside_the_cache_as_eager_in_one_graph(monkeypatch):
    from cadence.accel.registry import get_technique

    model = _model()
    backend = apply_backend(model, AttentionBackendConfig(backend="math"))
    eager = _latents(model)
    dense = _counting(monkeypatch, kernels, "dense")
    technique = get_technique("compile")
    compiled_blocks = technique.apply(model, technique.config(backend="aot_eager"))
    torch._dynamo.reset()  # graphs compiled by earlier tests would be reused and not counted
    torch._dynamo.utils.counters.clear()
    compiled = _latents(model)
    compiled_blocks.remove()
    backend.remove()
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
    assert dense == [(32, 32)] * 4 + [(32, 64)] * 2  # the opaque op still runs the term's backend
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]


# -- order and removal ----------------------------------------------------------------------------


def _apply(model, first: str):
    terms = {
        "backend": lambda: apply_backend(model, AttentionBackendConfig(backend="math")),
        "cache": lambda: apply_policy(model, WindowConfig(frames=4)),
    }
    second = "cache" if first == "backend" else "backend"
    return {first: terms[first](), second: terms[second]()}


def _cached_forward(model) -> torch.Tensor:
    cache = getattr(model, KV_CACHE)
    cache.reset()
    cache.set_mode("write")
    _forward(model, seeded_randn(1, 3, 2, 8, 8, seed=3))
    cache.commit()
    return _forward(model, seeded_randn(1, 3, 2, 8, 8, seed=4))


def test_either_order_of_application_builds_the_same_model(monkeypatch):
    model = _model()
    backends, original = [], kernels.dense

    def dense(query, key, value, attn_mask, scale, backend):  # as the cache calls it
        backends.append(backend)
        return original(query, key, value, attn_mask, scale, backend)

    monkeypatch.setattr(kernels, "dense", dense)
    results = {}
    for first in ("backend", "cache"):
        handles = _apply(model, first)
        stand_ins = _processors(model)
        results[first] = (
            _cached_forward(model),
            [type(p.below) for p in stand_ins],
            [type(p.processor) for p in stand_ins],
            [p.backend for p in stand_ins],
        )
        for handle in handles.values():
            handle.remove()
    assert torch.equal(results["backend"][0], results["cache"][0])
    assert results["backend"][1:] == results["cache"][1:]
    assert backends == ["math"] * 8  # two layers x (write, read) x two orders: none went around the term


@pytest.mark.parametrize("first", ["backend", "cache"])
@pytest.mark.parametrize("removed_first", ["backend", "cache"])
def test_remove_in_either_order_restores_the_model_bit_for_bit(first, removed_first):
    model = _model()
    x = seeded_randn(1, 3, 2, 8, 8, seed=5)
    before, processors, hooks = _forward(model, x), _processors(model), dict(model._forward_pre_hooks)
    handles = _apply(model, first)
    assert not torch.equal(_cached_forward(model), _forward(model, x))  # the cache is written and read
    handles.pop(removed_first).remove()
    left = next(iter(handles.values()))
    if removed_first == "backend":  # the cache alone: a native call over [cache, chunk]
        assert all(p.backend is None and p.below is q for p, q in zip(_processors(model), processors))
    else:  # the term alone, on diffusers' processors
        assert not hasattr(model, KV_CACHE) and all(p.processor is q for p, q in zip(_processors(model), processors))
    left.remove()
    assert _processors(model) == processors and dict(model._forward_pre_hooks) == hooks
    assert not hasattr(model, KV_CACHE)
    assert torch.equal(_forward(model, x), before)


# -- refusals -------------------------------------------------------------------------------------


def test_a_sparse_token_pattern_beside_the_cache_is_refused_with_the_reason():
    model = _model()
    processors = _processors(model)
    sparse = apply_sparse_window(model, SparseWindowConfig(density=0.5, dense_fraction=0))
    with pytest.raises(
        ValueError,
        match=r"already has a cadence technique \(sparse-window\(.*\), a sparse token "
        r"pattern whose block mask covers the model's whole token layout.*valid "
        r"beside the KV cache: attention-backend \(dense\)",
    ):
        apply_policy(model, WindowConfig(frames=4))
    sparse.remove()
    assert _processors(model) == processors and not hasattr(model, KV_CACHE)

    cache = apply_policy(model, WindowConfig(frames=4))  # the other order: the pattern after the cache
    cached = _processors(model)
    with pytest.raises(ValueError, match=r"the model streams with a KV cache.*valid beside the KV cache: "
                                         r"attention-backend \(a dense backend\)"):
        apply_sparse_window(model, SparseWindowConfig(density=0.5, dense_fraction=0))
    assert _processors(model) == cached
    cache.remove()
    assert _processors(model) == processors


def test_a_second_backend_term_beneath_the_cache_is_refused_and_leaves_the_first():
    model = _model()
    handles = _apply(model, "cache")
    stand_ins = _processors(model)
    with pytest.raises(ValueError, match=r"attention-backend: the model already has an attention technique; remove it"):
        apply_backend(model, AttentionBackendConfig(backend="sage"))
    assert _processors(model) == stand_ins and [p.backend for p in stand_ins] == ["math", "math"]
    for handle in handles.values():
        handle.remove()


def test_an_unknown_backend_is_refused_naming_the_valid_ones():
    with pytest.raises(
        ValueError,
        match=r"backend='sage-int4'; valid: auto, cudnn, flash, efficient, math, flex, "
        r"sage, sage-fp8",
    ):
        AttentionBackendConfig(backend="sage-int4")


# -- the command ----------------------------------------------------------------------------------


def test_the_stream_command_takes_sage_beside_the_cache_and_refuses_a_sparse_pattern(monkeypatch, tmp_path):
    caption, pipes = "a small red square moves left over a blue gradient", []

    def load(name, device=None, **_):
        pipe = RefVideoPipeline(
            transformer=tiny_wan(attention_head_dim=64, num_layers=1),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            sample_size={"frames": 2, "height": 8, "width": 8},
        )
        pipe.prompt_cache = {caption: (text(), torch.zeros(1, TEXT_DIM))}
        pipes.append(pipe)
        return pipe

    monkeypatch.setattr(cadence, "load", load)
    kernel = _counting(monkeypatch, _sage_triton, "sage_attention")
    common = [
        "--prompt",
        caption,
        "--seconds",
        "0.5",
        "--frames-per-chunk",
        "2",
        "--steps-per-chunk",
        "1",
        "--device",
        "cpu",
    ]
    recipe = "attention-backend(backend='sage') + kv-sink-window(sink=1, frames=4)"
    result = CliRunner().invoke(stream_command, [*common, "--out", str(tmp_path / "sage.gif"), "--recipe", recipe])
    assert result.exit_code == 0, result.output
    assert "4 frames (0.50 s of video at 8 fps)" in result.output
    assert (32, 64) in kernel  # chunk 1 read chunk 0 through the kernel
    refused = CliRunner().invoke(
        stream_command,
        [
            *common,
            "--out",
            str(tmp_path / "sparse.gif"),
            "--recipe",
            "sparse-window + kv-sink-window(sink=1, frames=4)",
        ],
    )
    assert refused.exit_code != 0 and "a sparse token pattern whose block mask covers" in refused.output
    assert not (tmp_path / "sparse.gif").exists()
    for pipe in pipes:  # restored
        assert not hasattr(pipe.transformer, KV_CACHE)
        assert all(type(p).__module__.startswith("diffusers.") for p in _processors(pipe.transformer))
