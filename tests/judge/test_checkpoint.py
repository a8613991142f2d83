"""The judge's weights: a round trip, and damaged or foreign files refused before the model is built."""

import pytest
import torch
from safetensors.torch import save_file

from cadence.judge import checkpoint
from cadence.judge.model import Judge


def test_save_and_load_give_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    judge = Judge().eval()
    path = checkpoint.save(judge, tmp_path / "j.safetensors", {"steps": 3})
    loaded = checkpoint.load(path)
    clip = torch.rand(1, 3, 8, 32, 32) * 2 - 1
    assert torch.equal(judge(clip)[2], loaded(clip)[2])


def _damaged(tmp_path):
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    return path


def _foreign(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path))
    return path


def _wrong_shape(tmp_path):
    state = {k: v.clone() for k, v in Judge().state_dict().items()}
    state["clip_reader.queries"] = torch.zeros(3, 3)
    path = tmp_path / "shape.safetensors"
    save_file(state, str(path))
    return path


def _nan(tmp_path):
    state = {k: v.clone() for k, v in Judge().state_dict().items()}
    state["clip_reader.queries"][0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(state, str(path))
    return path


BAD = {
    "missing": (lambda tmp_path: tmp_path / "nope.safetensors", "does not exist"),
    "damaged": (_damaged, "is damaged"),
    "foreign": (_foreign, "does not hold the judge's tensors"),
    "wrong shape": (_wrong_shape, "clip_reader.queries of shape (3, 3)"),
    "nan": (_nan, "NaN or Inf in clip_reader.queries"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_checkpoint_is_refused_naming_the_file_before_any_weights_load(tmp_path, loads, case):
    make, reason = BAD[case]
    path = make(tmp_path)
    with pytest.raises(ValueError) as refused:
        checkpoint.load(path)
    message = str(refused.value)
    assert str(path) in message and reason in message and "cadence.judge.train" in message
    assert loads == []
