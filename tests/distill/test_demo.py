"""cadence demo's student part: the shipped ref-video-4step beside its teacher."""

from __future__ import annotations

from cadence.distill.demo import student_beside_teacher


def test_the_shipped_student_is_shown_beside_its_teacher(tmp_path):
    captions = ["a large red square moves right over a plain white background",
                "a small blue circle stays still over a green checkerboard"]
    shown = student_beside_teacher("ref-video-4step", captions, 2, "cpu", tmp_path)
    assert shown["teacher"] == "ref-video" and shown["captions"] == 2
    assert (shown["teacher_forwards"], shown["student_forwards"]) == (4, 4)  # 2 steps with CFG; 4 without
    assert all(0 <= shown["adherence"][name] <= 1 for name in ("teacher", "student"))
    assert shown["fd"]["student"] is not None and shown["fd"]["student"] >= 0
    assert (tmp_path / "student.png").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "videos").iterdir()) == ["student-00.gif", "student-01.gif"]
