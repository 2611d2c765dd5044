"""torch.optim's conventions, as PyTorch's own test/test_optim.py checks them, hold for selopt."""

import pytest
import torch

import selopt


@pytest.mark.parametrize("optimizer_class", [selopt.AdamW, selopt.MoFO])
def test_param_groups_given_as_generators_are_kept_and_trained(optimizer_class):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    opt = optimizer_class([{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 0.1}])
    reference = torch.optim.AdamW([{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 0.1}])
    assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in reference.param_groups] == [2, 2]
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
