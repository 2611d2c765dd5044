"""torch.compile: selopt's step runs eagerly inside compiled code, with no recompiles, and gives eager results."""

from __future__ import annotations

import pytest
import torch

import selopt

STEPS = 6


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    opt = selopt.MoFO(selopt.param_groups(model, weight_decay=0.1, fraction=0.3), lr=1e-2, backend="torch")
    return model, opt


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(5, 8, generator=gen) for _ in range(STEPS)]


def _eager():
    model, opt = _setup()
    for x in _batches():
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model


@pytest.fixture
def no_recompiles():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
    torch._dynamo.reset()


def test_compiled_step_is_the_eager_step(no_recompiles):
    model, opt = _setup()
    step = torch.compile(opt.step, backend="aot_eager")
    for x in _batches():
        model(x).square().mean().backward()
        step()  # each step count used to recompile the torch reference until the recompile limit
        opt.zero_grad()
    for p, q in zip(model.parameters(), _eager().parameters()):
        assert torch.equal(p, q)


def test_compiled_training_step_with_the_optimizer_inside(no_recompiles):
    model, opt = _setup()

    @torch.compile(backend="aot_eager")
    def train_step(x):
        loss = model(x).square().mean()
        loss.backward()
        opt.step()  # a graph break: the model's forward and backward compile, the step runs eagerly
        opt.zero_grad()
        return loss

    for x in _batches():
        train_step(x)
    for p, q in zip(model.parameters(), _eager().parameters()):
        assert torch.equal(p, q)
