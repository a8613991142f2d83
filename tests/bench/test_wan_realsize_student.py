"""benchmarks/wan_realsize.py's few-step student rows (issue 17, item 4), run by --tiny on the
CPU: the student's rows against the teacher's in one run, the teacher timed on fewer steps only
where every step costs the same; bad step counts refused with the valid range."""

import argparse
import json
import sys
from pathlib import Path
from unittest import mock

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import wan_realsize


def refusal(capsys, **given) -> str:
    args = argparse.Namespace(**{"steps": 50, "timed_steps": None, "student_steps": None, **given})
    with pytest.raises(SystemExit):
        wan_realsize.check_args(argparse.ArgumentParser(), args)
    return capsys.readouterr().err


def test_step_techniques_are_found_by_their_registration():
    assert wan_realsize.step_techniques("magcache(budget=0.3, calibration='x') + compile + fp8") == ["magcache"]
    assert wan_realsize.step_techniques(f"compile + fp8 + {wan_realsize.SAGE}") == []
    assert wan_realsize.step_techniques("baseline") == []


def test_bad_step_counts_are_refused_with_the_valid_range(capsys):
    assert "--timed-steps 60: must be between 1 and --steps (50)" in refusal(capsys, timed_steps=60)
    assert "--timed-steps 0: must be between 1" in refusal(capsys, timed_steps=0)
    assert "--student-steps 0: must be at least 1" in refusal(capsys, student_steps=0)


def test_tiny_run_gives_the_student_rows_against_the_scaled_teacher(tmp_path):
    out = tmp_path / "wan.json"
    argv = ["wan_realsize.py", "--tiny", "--recipes", "baseline", "fixed-interval(interval=2)", "--steps", "4",
            "--timed-steps", "2", "--student-steps", "2", "--student-recipes", "--out", str(out)]
    with mock.patch.object(sys, "argv", argv):
        wan_realsize.main()
    teacher, cached, student = json.loads(out.read_text())["results"]
    assert (teacher["model"], teacher["forwards"], teacher["timed_steps"]) == ("teacher", 8, 2)
    assert teacher["seconds"] == pytest.approx(2 * teacher["timed_seconds"])  # scaled to the 4 steps reported
    # A step technique's cost depends on where its steps fall: timed on every step, not scaled.
    assert (cached["timed_steps"], cached["seconds"]) == (4, cached["timed_seconds"])
    assert (student["model"], student["forwards"], student["timed_steps"]) == ("student", 2, 2)
    assert student["forward_ratio"] == student["ideal_speedup"] == 4.0  # 8 forwards with CFG over 2 without
    assert student["speedup"] == pytest.approx(teacher["seconds"] / student["seconds"])
