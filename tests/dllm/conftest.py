import pytest
import torch

from cadence.dllm.tokenizer import build_tokenizer
from cadence.models.llada import build_llada


@pytest.fixture(scope="module")
def tiny():
    """A seeded random LLaDA-architecture model at the CPU size, and the character tokenizer."""
    torch.manual_seed(0)
    return build_llada("tiny").eval(), build_tokenizer()
