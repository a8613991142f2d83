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


def test_a_new_run_starts_from_a_checkpoints_weights_and_counts_its_steps(tmp_path):
    config = TrainConfig(size="tiny", gen_length=32, block_length=8, batch=2, seconds=0.5, tasks=("copy",))
    first = train(config, tmp_path / "first", log=lambda *_: None)
    trained, _ = dllm.load(tmp_path / "first")
    lines = []
    # a zero budget runs no step: the new checkpoint holds exactly the weights it started from
    second = train(TrainConfig(**{**config.__dict__, "seconds": 0.0}), tmp_path / "second", log=lines.append,
                   init=tmp_path / "first")
    assert any("starting from the weights" in line for line in lines)
    assert second["init"] == str(tmp_path / "first") and second["total_steps"] == first["steps"] + second["steps"]
    started, _ = dllm.load(tmp_path / "second")
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), started.state_dict().values()))


def test_starting_from_another_architecture_is_refused(tmp_path):
    train(TrainConfig(size="tiny", gen_length=32, block_length=8, batch=2, seconds=0.2, tasks=("copy",)),
          tmp_path / "tiny", log=lambda *_: None)
    with pytest.raises(ValueError, match="is another architecture"):
        train(TrainConfig(size="ref-dllm", gen_length=32, block_length=8, batch=2, seconds=0.2, tasks=("copy",)),
              tmp_path / "big", log=lambda *_: None, init=tmp_path / "tiny")


def test_the_balanced_loss_weighs_the_answer_as_much_as_the_tail():
    from cadence.dllm.train import balanced_loss

    logits = torch.zeros(1, 4, 3)
    logits[0, 0, 1] = 10.0  # the answer token right, the three tail tokens wrong (uniform)
    labels = torch.tensor([[1, 2, 2, 2]])
    answer = torch.tensor([[True, False, False, False]])
    answer_loss = torch.nn.functional.cross_entropy(logits[0, :1], labels[0, :1])
    tail_loss = torch.nn.functional.cross_entropy(logits[0, 1:], labels[0, 1:])
    assert torch.allclose(balanced_loss(logits, labels, answer), (answer_loss + tail_loss) / 2)
    labels[0, 1:] = -100  # no masked tail: the answer alone
    assert torch.allclose(balanced_loss(logits, labels, answer), answer_loss)


def test_an_error_making_a_batch_reaches_the_loop_and_the_producer_stops(monkeypatch):
    import random
    import time

    from cadence.dllm import train as training
    from cadence.dllm.tokenizer import build_tokenizer

    made = []

    def make_batch(*args):
        if len(made) == 3:
            raise ValueError("bad draw")
        made.append(len(made))
        return (torch.tensor(len(made)),)

    monkeypatch.setattr(training, "make_batch", make_batch)
    batches = training._Batches(TrainConfig(size="tiny", gen_length=32, block_length=8), build_tokenizer(),
                                random.Random(0), torch.Generator(), ahead=1)
    assert [int(batches.next("cpu")[0]) for _ in range(3)] == [1, 2, 3]  # in order
    with pytest.raises(ValueError, match="bad draw"):
        batches.next("cpu")
    batches.close()
    assert not batches.thread.is_alive()
    made[:] = [0, 0]  # one batch fills the queue, the next draw fails while it is full
    stuck = training._Batches(TrainConfig(size="tiny", gen_length=32, block_length=8), build_tokenizer(),
                              random.Random(0), torch.Generator(), ahead=1)
    time.sleep(0.3)  # the producer now waits to hand over its error
    stuck.close()  # the loop stopped taking: close returns all the same
    assert not stuck.thread.is_alive()
