"""`cadence tune` refuses bad input before loading anything, and a tuned recipe saved beside
a checkpoint becomes its default."""

import importlib.util

from click.testing import CliRunner

from cadence.cli import main
from cadence.models.defaults import TUNED_RECIPE, default_recipe
from cadence.recipe import Recipe
from cadence.tune import quality


def run(*args):
    return CliRunner().invoke(main, ["tune", *args])


def test_an_unknown_technique_in_exclude_is_refused_by_name(tmp_path):
    result = run("--model", "ref-video", "--exclude", "magcache,telecache", "--out", str(tmp_path / "out"))
    assert result.exit_code != 0
    assert "--exclude names unknown technique(s) 'telecache'; valid:" in result.output and "magcache" in result.output


def test_min_adherence_without_the_judge_is_refused_with_the_reason(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == quality.JUDGE else real(name, *a))
    result = run("--model", "ref-video", "--min-adherence", "0.8", "--out", str(tmp_path / "out"))
    assert result.exit_code != 0 and "--min-adherence 0.8 needs the judge (cadence.judge)" in result.output


def test_a_time_budget_that_is_no_duration_is_refused(tmp_path):
    result = run("--model", "ref-video", "--time-budget", "soon", "--out", str(tmp_path / "out"))
    assert result.exit_code != 0 and "--time-budget 'soon': expected a duration" in result.output


def test_save_default_is_refused_for_a_reference_model(tmp_path):
    result = run("--model", "ref-video", "--save-default", "--out", str(tmp_path / "out"))
    assert result.exit_code != 0 and "ref-video keeps the shipped defaults" in result.output


def test_a_tuned_recipe_beside_a_checkpoint_is_its_default_and_families_keep_theirs(tmp_path):
    tuned = Recipe.parse("fixed-interval(budget=0.4)")
    (tmp_path / TUNED_RECIPE).write_text(f"# tuned by cadence tune: 2.1x\n{tuned.to_toml()}")
    chosen = default_recipe(str(tmp_path))
    assert Recipe.parse(chosen.recipe) == tuned and chosen.measured == "tuned by cadence tune: 2.1x"
    assert "magcache" in default_recipe("wan").recipe
    listed = CliRunner().invoke(main, ["recipes", "--model", str(tmp_path)])
    assert listed.exit_code == 0 and str(tmp_path / TUNED_RECIPE) in listed.output
