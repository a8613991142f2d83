"""benchmarks/judge_quality.py's --recipes: each recipe's clips against the baseline's, cached
by recipe, the pipeline given back unchanged; the recipe list refused before a model loads."""

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import TEXT_DIM, tiny_wan
from diffusers import FlowMatchEulerDiscreteScheduler

from cadence import generation
from cadence.bench.frontier import technique_of
from cadence.reference import data
from cadence.reference.pipelines import RefVideoPipeline

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import judge_quality
from sparse_sweep import PATTERNS

PROMPTS = data.heldout_prompts(2, video=True)


def tiny_pipeline() -> RefVideoPipeline:
    """A 3-block video pipeline at 2 x 8 x 8 with the held-out captions' embeddings made up."""
    pipe = RefVideoPipeline(transformer=tiny_wan(), scheduler=FlowMatchEulerDiscreteScheduler(),
                            sample_size={"frames": 2, "height": 8, "width": 8})
    generator = torch.Generator().manual_seed(0)
    pipe.prompt_cache = {p: (torch.randn(1, 4, TEXT_DIM, generator=generator), torch.randn(1, TEXT_DIM, generator=generator))
                         for p in [*PROMPTS, ""]}
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(load, cache: Path, recipe: str):
    return judge_quality.generate_all("tiny", PROMPTS, [0], 3, "cpu", cache, None, recipe, load)


def test_expand_recipes_puts_the_baseline_first_and_expands_sets_once():
    recipes = judge_quality.expand_recipes(["caching", "magcache(budget=0.3)", "sparse"])
    assert recipes[0] == "baseline"
    assert len(recipes) == 1 + len(judge_quality.CACHING) + len(judge_quality.SPARSE)  # the repeat kept once
    assert judge_quality.expand_recipes([]) == recipes  # none named: every set
    assert {technique_of(r) for r in recipes[1:]} == {"magcache", "teacache", "first-blocks", *PATTERNS}


def test_a_recipe_cadence_cannot_parse_is_refused_naming_it_and_the_sets():
    with pytest.raises(SystemExit, match=r"--recipes 'magcache\(budget=7\)'.*caching, sparse"):
        judge_quality.expand_recipes(["magcache(budget=7)"])
    with pytest.raises(SystemExit, match=r"'no-such-cache'.*caching, sparse"):
        judge_quality.expand_recipes(["no-such-cache"])


def test_the_cache_key_holds_the_recipe_and_keeps_the_baselines_old_key(tmp_path):
    old_key = hashlib.sha256(json.dumps(["m", PROMPTS, [0], 3]).encode()).hexdigest()[:16]
    baseline = judge_quality.cache_path(tmp_path, "m", PROMPTS, [0], 3, "baseline")
    assert baseline.name == f"m-3steps-{old_key}.safetensors"
    assert judge_quality.cache_path(tmp_path, "m", PROMPTS, [0], 3, "magcache(budget=0.3)") != baseline
    gpu = judge_quality.cache_path(tmp_path, "m", PROMPTS, [0], 3, "baseline", device="cuda:0")
    assert gpu != baseline and gpu == judge_quality.cache_path(tmp_path, "m", PROMPTS, [0], 3, "baseline", "cuda")


def test_a_student_folder_is_judged_on_its_teachers_captions(tmp_path):
    from cadence.loading import reference_of
    from cadence.reference.models import REFERENCE_MODELS

    (tmp_path / "student.json").write_text(json.dumps({"teacher": "ref-video", "steps": 2}))
    assert reference_of(str(tmp_path)) is REFERENCE_MODELS["ref-video"]
    assert reference_of(str(tmp_path / "elsewhere")) is None


def test_recipe_clips_are_cached_timed_and_the_pipeline_is_restored(tmp_path):
    pipe = tiny_pipeline()
    load = lambda: pipe
    before, made = generate(load, tmp_path, "baseline")
    reused, reused_made = generate(load, tmp_path, "fixed-interval(interval=2)")
    after, _ = generate(load, tmp_path / "again", "baseline")  # remove() gave the model back
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert len(made["seconds"]) == len(PROMPTS) and reused_made["ideal_speedup"] > 1
    quality = judge_quality.fidelity(reused, before)
    assert quality["n_identical"] == 0 and quality["psnr"] is not None and quality["ssim"] < 1

    def no_model():
        raise AssertionError("a cached recipe loaded the model")

    cached, cached_made = generate(no_model, tmp_path, "fixed-interval(interval=2)")
    assert all(torch.equal(a, b) for a, b in zip(reused, cached)) and cached_made == reused_made


def test_a_recipe_that_computes_every_step_is_the_baseline_bit_for_bit(tmp_path):
    pipe = tiny_pipeline()
    size, (_, guidance) = generation.resolve_size(pipe), generation.sampling(pipe, 3)
    plain = [generation.generate(pipe, p, steps=3, seed=0, guidance_scale=guidance, size=size) for p in PROMPTS]
    baseline, _ = generate(lambda: pipe, tmp_path, "baseline")
    assert all(torch.equal(a, b) for a, b in zip(plain, baseline))  # the baseline is the pipeline untouched
    every_step, _ = generate(lambda: pipe, tmp_path, "fixed-interval(interval=1)")
    quality = judge_quality.fidelity(every_step, baseline)
    assert quality == {"psnr": None, "psnr_min": None, "n_identical": len(PROMPTS), "ssim": 1.0}


def test_speed_is_the_ratio_of_median_generation_times():
    baseline = {"seconds": [9.0, 1.0, 1.2, 1.0], "ideal_speedup": 1.0}  # a slow first call does not count
    faster = {"seconds": [0.5, 0.5, 0.4], "ideal_speedup": 2.0}
    assert judge_quality.speed(faster, baseline) == {"seconds_per_generation": 0.5, "speedup": 2.2,
                                                     "ideal_speedup": 2.0}
    old_cache = {"seconds": None, "ideal_speedup": None}
    assert judge_quality.speed(faster, old_cache)["speedup"] is None
