"""A shipped student's weights packed as their difference from the teacher's
(cadence.distill.pack, cadence.loading.pack_delta): unpacked bit for bit, refused against other
teacher weights, opened by cadence.load as the student it was."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_pipe, tiny_wan

import cadence
from cadence import loading
from cadence.distill.pack import pack
from cadence.reference import models


@pytest.fixture
def teacher_and_student(tmp_path, monkeypatch):
    """A tiny bf16 teacher in place of ref-video's checkpoint, and a student of it: the teacher's
    weights moved a little (as a few-step student's are), saved as cadence.distill saves one."""
    monkeypatch.setattr(models, "CHECKPOINTS", tmp_path / "checkpoints")
    monkeypatch.setenv("CADENCE_CACHE", str(tmp_path / "cache"))
    teacher = tiny_wan().to(torch.bfloat16)
    teacher.save_pretrained(tmp_path / "checkpoints" / "ref-video" / "transformer")
    student = tiny_wan()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(1e-3 * torch.randn(parameter.shape, generator=generator))
    pipe = tiny_pipe("video", student.to(torch.bfloat16))
    pipe.save_pretrained(tmp_path / "student", max_shard_size="20KB")  # sharded, as the shipped one was
    record = {"steps": 2, "sigmas": [1.0, 0.5], "guidance_scale": 1.0, "teacher": "ref-video"}
    (tmp_path / "student" / "student.json").write_text(json.dumps(record))
    (tmp_path / "student" / "state").mkdir()
    (tmp_path / "student" / "state" / "resume.json").write_text("{}")
    return teacher, student, tmp_path


def test_a_packed_student_loads_bit_for_bit_as_the_student(teacher_and_student):
    _, student, tmp_path = teacher_and_student
    packed = pack(tmp_path / "student", tmp_path / "packed")
    assert not (packed / "state").exists()
    assert [p.name for p in (packed / "transformer").iterdir() if "safetensors" in p.name] == [
        "diffusion_pytorch_model.safetensors.delta.xz"]
    pipe = cadence.load(str(packed), text_encoder=False)
    assert pipe.student["steps"] == 2 and pipe.transformer.dtype == torch.float32
    loaded = pipe.transformer.state_dict()
    assert all(torch.equal(loaded[name].to(torch.bfloat16), tensor) for name, tensor in student.state_dict().items())


def test_a_delta_is_refused_against_other_teacher_weights_even_once_unpacked(teacher_and_student):
    teacher, _, tmp_path = teacher_and_student
    packed = pack(tmp_path / "student", tmp_path / "packed")
    cadence.load(str(packed), text_encoder=False)  # unpacked into the cache against the right teacher
    with torch.no_grad():
        next(teacher.parameters()).add_(1.0)
    teacher.save_pretrained(tmp_path / "checkpoints" / "ref-video" / "transformer")
    with pytest.raises(ValueError, match="packed against other ref-video weights than the shipped ones"):
        cadence.load(str(packed), text_encoder=False)
    assert not list((tmp_path / "cache" / "checkpoints").glob("*.partial"))  # the refused unpack left nothing


def test_a_refused_pack_leaves_no_folder(teacher_and_student):
    _, student, tmp_path = teacher_and_student
    student.float().save_pretrained(tmp_path / "student" / "transformer")  # float32: not packable
    with pytest.raises(ValueError, match="are not bf16 tensors of the teacher's shape and dtype"):
        pack(tmp_path / "student", tmp_path / "packed")
    assert not (tmp_path / "packed").exists()


def test_packing_refuses_a_teacher_that_is_not_a_reference_model_and_an_existing_out(teacher_and_student):
    _, _, tmp_path = teacher_and_student
    record = json.loads((tmp_path / "student" / "student.json").read_text())
    (tmp_path / "student" / "student.json").write_text(json.dumps({**record, "teacher": "/some/folder"}))
    with pytest.raises(ValueError, match="teacher '/some/folder'; a packed student needs a reference teacher"):
        pack(tmp_path / "student", tmp_path / "packed")
    (tmp_path / "student" / "student.json").write_text(json.dumps(record))
    (tmp_path / "packed").mkdir()
    with pytest.raises(ValueError, match="exists; pack into a new folder"):
        pack(tmp_path / "student", tmp_path / "packed")


def test_the_shipped_student_is_known_by_name():
    assert "ref-video-4step" in models.STUDENTS
    folder = models.STUDENTS["ref-video-4step"]
    assert json.loads((folder / "student.json").read_text())["teacher"] == "ref-video"
    assert (folder / "transformer" / f"diffusion_pytorch_model.safetensors{loading.DELTA}").is_file()
