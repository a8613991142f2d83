"""What the judge's tests share."""

import pytest

from cadence.judge.model import Judge


@pytest.fixture
def loads(monkeypatch):
    """Records every load of weights into a judge, to show a refusal comes before it."""
    calls = []
    original = Judge.load_state_dict
    monkeypatch.setattr(Judge, "load_state_dict", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    return calls
