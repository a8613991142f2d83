import json

import pytest
import torch

from cadence import dllm
from cadence.dllm.train import TrainConfig, train


def test_training_saves_a_loadable_checkpoint_and_resumes(tmp_path):
    config = TrainConfig(size="tiny", gen_length=32, block_length=8, batch=4, seconds=1.0, tasks=("copy",))
    first = train(config, tmp_path, log=lambda *_: None)
    model, tokenizer = dllm.load(tmp_path)
    assert first["steps"] >= 1 and model.config.num_hidden_layers == 3
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert dllm.generate(model, tokenizer, ["copy:ab="], 32).tokens.shape == (1, 32)
    more = {**config.__dict__, "seconds": first["seconds"] + 0.5}  # the budget is total time: always one more step
    resumed = train(TrainConfig(**more), tmp_path, log=lambda *_: None)
    assert resumed["steps"] > first["steps"]
    assert json.loads((tmp_path / "train.json").read_text())["steps"] == resumed["steps"]


def test_resuming_with_another_configuration_is_refused(tmp_path):
    train(TrainConfig(size="tiny", gen_length=32, block_length=8, batch=2, seconds=0.5, tasks=("copy",)), tmp_path,
          log=lambda *_: None)
    with pytest.raises(ValueError, match="was written by another configuration"):
        train(TrainConfig(size="tiny", gen_length=32, block_length=8, batch=4, seconds=1.0, tasks=("copy",)),
              tmp_path, log=lambda *_: None)


@pytest.mark.parametrize("options, message", [
    (dict(gen_length=16, block_length=8), r"gen_length=16 must be > 16"),
    (dict(gen_length=40, block_length=16), r"gen_length=40 must be a multiple of block_length=16"),
    (dict(tasks=("divide",)), r"unknown task\(s\) 'divide'"),
])
def test_bad_training_configurations_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**options)
