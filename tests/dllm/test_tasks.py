import random

import pytest

from cadence.dllm.tasks import MAX_ANSWER, MAX_PROMPT, TASKS, evaluation_set
from cadence.dllm.tokenizer import build_tokenizer


def test_answers_are_exact():
    rng = random.Random(3)
    for _ in range(200):
        prompt, answer = TASKS["add"].draw(rng)
        assert eval(prompt[:-1]) == int(answer)
        prompt, answer = TASKS["mul"].draw(rng)
        assert eval(prompt[:-1]) == int(answer)
        prompt, answer = TASKS["reverse"].draw(rng)
        assert prompt[4:-1][::-1] == answer
        prompt, answer = TASKS["retrieve"].draw(rng)
        pairs = dict(pair.split(":") for pair in prompt.split(";")[:-1])
        assert pairs[prompt.split(";?")[1][:-1]] == answer
        prompt, answer = TASKS["brackets"].draw(rng)
        closed = prompt[6:-1] + answer
        for _ in range(len(closed)):
            for pair in ("()", "[]", "{}", "<>"):
                closed = closed.replace(pair, "")
        assert closed == ""


def test_every_draw_fits_the_declared_bounds_and_the_tokenizer():
    tokenizer, rng = build_tokenizer(), random.Random(0)
    for task in TASKS.values():
        for _ in range(300):
            prompt, answer = task.draw(rng)
            assert len(prompt) <= MAX_PROMPT and len(answer) <= MAX_ANSWER
            assert tokenizer.unk_token_id not in tokenizer(prompt + answer)["input_ids"]
            assert tokenizer.decode(tokenizer(prompt)["input_ids"], skip_special_tokens=True) == prompt


def test_evaluation_set_is_fixed_and_unknown_tasks_are_refused():
    assert evaluation_set("copy", 5) == evaluation_set("copy", 5)
    assert evaluation_set("copy", 5) != evaluation_set("copy", 5, seed=1)
    with pytest.raises(ValueError, match=r"unknown task\(s\) 'divide'; valid: add, mul, sort"):
        evaluation_set("divide", 3)
