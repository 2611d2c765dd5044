"""Names the library's docstring examples use, so that `pytest --doctest-modules selopt` runs them."""

import pytest
import torch

import selopt
from bench.tiny_llama import TinyLlama, TinyLlamaConfig

# Under Triton's interpreter: every hint a kernel makes is checked, and tests can run a launch's
# programs out of order (tests/interpreter_checks.py).
pytest_plugins = ["tests.interpreter_checks"]


def tiny_llama(layers: int = 4) -> TinyLlama:
    """A seeded, randomly initialised decoder with Hugging Face Llama parameter names."""
    torch.manual_seed(0)
    return TinyLlama(TinyLlamaConfig(vocab_size=32, dim=16, n_layers=layers, n_heads=2, ffn_dim=24, max_seq_len=8))


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace.update(torch=torch, selopt=selopt, tiny_llama=tiny_llama)
