"""benchmarks/serve_throughput.py: its random Wan pipeline (at a tiny config here; the 1.3B
config on the GPU) loads and serves through diffusers' own WanPipeline, and a run reports
throughput and overhead."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_throughput.py"
TINY_WAN = {"patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 16,
            "out_channels": 16, "text_dim": 64, "freq_dim": 32, "ffn_dim": 64, "num_layers": 2,
            "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 32}
TINY_VAE = {"base_dim": 8, "num_res_blocks": 1}


def _script():
    spec = importlib.util.spec_from_file_location("serve_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_built_wan_pipeline_is_served_through_diffusers_wan_pipeline(serve, wait, tmp_path):
    from cadence.serve.pipelines import load_models
    from cadence.serve.settings import ServeSettings

    directory = _script().build_wan(tmp_path / "wan", transformer_config=TINY_WAN, vae_config=TINY_VAE,
                                    dtype=torch.float32)
    models = load_models(ServeSettings(models=(f"wan={directory}",)))
    assert type(models["wan"].pipe).__name__ == "WanPipeline"
    assert models["wan"].describe()["default_size"] == {"height": 480, "width": 832, "frames": 81}  # Wan2.1's
    assert models["wan"].default_recipe.startswith("magcache")  # the Wan family's
    with serve(models) as client:
        refused = client.post("/v1/videos", json={"prompt": "a red square", "height": 20, "width": 16, "frames": 5})
        assert refused.status_code == 422 and "multiple of 16" in refused.json()["error"]["message"]
        job = client.post("/v1/videos", json={"prompt": "a small red square moves left over a blue gradient",
                                               "recipe": "fixed-interval(interval=2)", "steps": 4, "height": 16,
                                               "width": 16, "frames": 5, "compare_baseline": True}).json()
        done = wait(client, job["id"])
    assert done["status"] == "completed", done["error"]
    assert done["step"] == done["total_steps"] == 8  # the diffusers pipeline's progress bar was followed
    assert done["stats"]["compute_fraction"] < 1


def test_a_run_reports_throughput_per_recipe_and_overhead(tmp_path):
    result = _script().main(["--model", "ref-video", "--recipes", "baseline", "--jobs", "2", "--overhead-jobs", "2",
                             "--steps", "2", "--frames", "1", "--height", "16", "--width", "16",
                             "--guidance-scale", "1", "--device", "cpu", "--data-dir", str(tmp_path / "data"),
                             "--out", str(tmp_path / "out.json")])
    (run,) = result["throughput"]
    assert run["jobs"] == 2 and run["videos_per_hour"] > 0 and run["wall_s"] >= run["mean_generation_s"]
    assert result["overhead"]["jobs"] == 2 and result["overhead"]["p50_serving_ms"] >= 0
    assert (tmp_path / "out.json").is_file()
