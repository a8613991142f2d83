"""``cadence demo``'s last part: a shipped few-step student beside its teacher, on the same
held-out captions and noise, timed and read by the judge."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from cadence.loading import STUDENT_FILE
from cadence.reference.models import STUDENTS


def _timed(pipe, captions: list[str], steps: int, guidance_scale: float, device: str) -> tuple[list, float]:
    """The clips of ``captions`` (seed 0) and the seconds they took (``bench.runner.timed``)."""
    from cadence import generation
    from cadence.bench.runner import timed

    size = generation.resolve_size(pipe)
    clips, seconds = [], 0.0
    for caption in captions:
        clip, spent, _ = timed(lambda caption=caption: generation.generate(
            pipe, caption, steps=steps, seed=0, guidance_scale=guidance_scale, size=size), device)
        clips.append(clip.float().cpu())
        seconds += spent
    return clips, seconds


def student_beside_teacher(student: str, captions: list[str], teacher_steps: int, device: str, out: Path) -> dict:
    """Generate ``captions`` (seed 0) with the student at its own steps and no CFG, and with its
    teacher at ``teacher_steps`` with CFG 4; write ``out/student.png`` (teacher's frames, then the
    student's) and ``out/videos/student-NN.gif``; return the times, forwards and the judge's
    adherence of both (FD too for two captions or more)."""
    import cadence
    from cadence.bench.report import write_video
    from cadence.distill.report import plot_samples
    from cadence.judge.score import judge_clips

    record = json.loads((STUDENTS[student] / STUDENT_FILE).read_text())
    teacher_pipe = cadence.load(record["teacher"], device=device)
    student_pipe = cadence.load(student, device=device)
    for pipe in (teacher_pipe, student_pipe):
        pipe.set_progress_bar_config(disable=True)
    steps, guidance = record["steps"], record["guidance_scale"]
    _timed(teacher_pipe, captions[:1], 1, 4.0, device)  # warm-ups: first calls cost more
    _timed(student_pipe, captions[:1], 1, guidance, device)
    teacher, teacher_seconds = _timed(teacher_pipe, captions, teacher_steps, 4.0, device)
    students, student_seconds = _timed(student_pipe, captions, steps, guidance, device)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    for index, clip in enumerate(students):
        write_video(out / "videos" / f"student-{index:02d}.gif", clip)
    titles = SimpleNamespace(sample_steps=teacher_steps, guidance_scale=4.0, steps=steps)
    plot_samples(teacher, students, captions, titles, out / "student.png")
    judged = {name: judge_clips(clips, captions) for name, clips in (("teacher", teacher), ("student", students))}
    return {
        "student": student, "teacher": record["teacher"], "captions": len(captions),
        "teacher_forwards": 2 * teacher_steps, "student_forwards": steps * (2 if guidance > 1 else 1),
        "teacher_seconds": teacher_seconds, "student_seconds": student_seconds,
        "adherence": {name: result["adherence"] for name, result in judged.items()},
        "fd": {name: result["fd"] for name, result in judged.items()},
    }
