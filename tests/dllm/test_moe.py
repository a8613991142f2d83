"""A mixture-of-experts LLaDA (the LLaDA-MoE layout at a CPU size) through the engine and its caches."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cadence import dllm
from cadence.dllm.plan import plan_of
from cadence.dllm.tokenizer import build_tokenizer
from cadence.models.llada import LLADA, build_llada, dllm_family_of

PROMPTS = ["12+34=", "copy:abc="]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def moe():
    torch.manual_seed(0)
    return build_llada("tiny-moe").eval(), build_tokenizer()


def test_every_layer_routes_through_experts_and_the_model_stays_a_llada(moe):
    model, _ = moe
    assert dllm_family_of(model) is LLADA
    blocks = [layer.mlp.block for layer in model.model.layers]
    assert len(blocks) == 2 and all(block.experts.gate_up_proj.shape[0] == 4 for block in blocks)
    assert all(block.gate.top_k == 2 for block in blocks)


def test_refreshing_the_dual_cache_every_step_is_the_uncached_moe_bit_for_bit(moe):
    model, tokenizer = moe
    plain = "semi-ar(block_length=4) + parallel(threshold=0.03)"
    with dllm.accelerate(model, plain):
        expected = dllm.generate(model, tokenizer, PROMPTS, 16)
    with dllm.accelerate(model, plain + " + dual-cache(refresh_every=1)") as acceleration:
        cached = dllm.generate(model, tokenizer, PROMPTS, 16)
        stats = acceleration.stats()
    assert torch.equal(cached.tokens, expected.tokens)
    assert stats["cached_forwards"] == 0 and stats["full_forwards"] == cached.forwards


def test_a_cached_step_on_an_unchanged_canvas_gives_the_full_moe_forward(moe):
    """Routing is per token, so recomputing the block alone routes its tokens as the full forward does."""
    model, _ = moe
    canvas = torch.randint(4, 59, (2, 24), generator=torch.Generator().manual_seed(1))
    full = model(input_ids=canvas).logits
    with dllm.accelerate(model, "semi-ar(block_length=4) + dual-cache"):
        plan = plan_of(model)
        plan.generation, plan.block_index, plan.window = 99, 1, (12, 16)
        model(input_ids=canvas)
        cached = model(input_ids=canvas).logits
        plan.window = None
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_the_real_size_bench_runs_the_moe_layout(tmp_path):
    out = tmp_path / "moe.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks/dllm_real_size.py"), "--size", "tiny-moe", "--lengths", "16",
                    "--batches", "1", "--blocks", "1", "--block", "8", "--prompt-length", "4", "--out", str(out)],
                   check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
                   capture_output=True)
    result = json.loads(out.read_text())
    assert result["meta"]["size"] == "tiny-moe" and result["meta"]["experts_implementation"] in ("grouped_mm", "eager")
    assert {row["recipe"].split(" + ", 1)[-1] for row in result["rows"][1:]} >= {"dual-cache", "prefix-cache"}
