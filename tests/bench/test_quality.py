"""The judge in the benchmark: adherence per output and FD per recipe, the baseline's too,
in results.jsonl, the summary and the report; absent where the prompts are not the world's."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from cadence.bench import quality, report
from cadence.bench.runner import BenchSettings, format_table, run_bench
from cadence.recipe import Recipe
from cadence.reference.data import heldout_prompts

RECIPE = Recipe.parse("fixed-interval(interval=2)")


@pytest.fixture(scope="module")
def judged_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("judged")
    settings = BenchSettings(model="ref-video", recipes=[RECIPE], prompts=heldout_prompts(2), seeds=[0],
                             out=root / "out", steps=2, device="cpu", cache_dir=root / "cache", max_rounds=1)
    rows, summary = run_bench(settings)
    return settings, rows, summary


def test_every_row_carries_adherence_and_its_recipes_fd(judged_run):
    settings, _, _ = judged_run
    written = [json.loads(line) for line in (settings.out / "results.jsonl").read_text().splitlines()]
    assert {row["recipe"] for row in written} == {"baseline", str(RECIPE)}
    for row in written:
        assert 0.0 <= row["adherence"] <= 1.0
        assert set(row["adherence_counts"]) == {"shape", "colour", "size", "motion", "count", "background",
                                                "background_colour"}
        assert row["fd"] is not None and row["fd"] >= 0  # two videos per recipe: FD is defined
    fds = {row["recipe"]: row["fd"] for row in written}
    assert len(fds) == 2 and all(row["fd"] == fds[row["recipe"]] for row in written)  # one FD per recipe


def test_the_summary_report_and_table_show_adherence_and_fd(judged_run):
    settings, _, summary = judged_run
    for entry in summary:
        assert entry["adherence"] is not None and entry["fd"] is not None
        assert set(entry["adherence_by_attribute"]) >= {"motion", "background_colour"}
    text = (settings.out / "report.md").read_text()
    assert "| adherence | FD |" in text and "## Adherence by attribute" in text and "Fréchet" in text
    assert "adherence" in format_table(summary).splitlines()[0]


def test_prompts_outside_the_world_are_not_judged_and_get_no_columns(tmp_path):
    assert quality.judged("ref-video", heldout_prompts(3))
    assert not quality.judged("ref-video", heldout_prompts(3, video=False))  # image captions for the video model
    assert quality.judged("ref-image", heldout_prompts(3, video=False))
    assert not quality.judged(str(tmp_path), heldout_prompts(3))  # a real checkpoint directory
    rows = [{"recipe": "baseline", "latency_s": 1.0, "speedup": 1.0, "psnr": float("inf"), "ssim": 1.0}]
    summary = report.summarize(rows)
    assert summary[0]["adherence"] is None and summary[0]["fd"] is None
    text = report.write_report(tmp_path / "r.md", summary, {"model": "x"}).read_text()
    assert "adherence" not in text.lower() and "adherence" not in format_table(summary)
