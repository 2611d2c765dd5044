"""Soft masks survive state_dict, deepcopy and pickle; their state dicts still load into torch.optim.AdamW."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import selopt


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _masked(model):
    opt = selopt.MoFO(selopt.param_groups(model, weight_decay=0.1, fraction=0.4), lr=1e-2, backend="torch")
    opt.set_soft_mask(model[0].weight, torch.linspace(0, 1, 5))                 # per row
    opt.set_soft_mask(model[2].weight, torch.rand(3, 5, generator=torch.Generator().manual_seed(1)))  # full shape
    return opt


def _train(model, opt, steps: int, first: int = 0):
    for step in range(first, first + steps):
        gen = torch.Generator().manual_seed(step)
        model(torch.randn(4, 6, generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dict_carries_masks_and_a_resume_continues_exactly():
    uninterrupted, resumed = _model(), _model()
    opt = _masked(uninterrupted)
    _train(uninterrupted, opt, 4)

    first = _model()
    first_opt = _masked(first)
    _train(first, first_opt, 2)
    saved = _roundtrip(first_opt.state_dict())
    assert torch.equal(saved["state"][0]["soft_mask"], torch.linspace(0, 1, 5))
    resumed.load_state_dict(first.state_dict())
    resumed_opt = selopt.MoFO(selopt.param_groups(resumed, weight_decay=0.1, fraction=0.4), lr=1e-2, backend="torch")
    resumed_opt.load_state_dict(saved)  # no set_soft_mask: the masks come from the state dict
    assert resumed_opt.state_dict()["state"].keys() == first_opt.state_dict()["state"].keys()
    _train(resumed, resumed_opt, 2, first=2)
    for p, q in zip(uninterrupted.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_deepcopy_and_pickle_keep_masks_on_the_copied_params():
    model = _model()
    opt = _masked(model)
    _train(model, opt, 1)
    for clone_model, clone_opt in (copy.deepcopy((model, opt)), pickle.loads(pickle.dumps((model, opt)))):
        assert len(clone_opt._soft_masks) == 2
        weight = clone_model[0].weight
        assert any(weight is p for p in clone_opt.param_groups[0]["params"])
        assert torch.equal(clone_opt._soft_masks[weight], opt._soft_masks[model[0].weight])
        _train(clone_model, clone_opt, 1, first=1)
    _train(model, opt, 1, first=1)
    assert torch.equal(model[0].weight, clone_model[0].weight)


def test_torch_adamw_loads_masks_keeps_them_and_gives_them_back():
    model = _model()
    opt = _masked(model)
    _train(model, opt, 1)
    saved = opt.state_dict()
    torch_opt = torch.optim.AdamW(selopt.param_groups(model, weight_decay=0.1, fraction=0.4), lr=1e-2)
    torch_opt.load_state_dict(_roundtrip(saved))
    _train(model, torch_opt, 1, first=1)  # torch steps and ignores the masks
    back = selopt.MoFO(selopt.param_groups(model, weight_decay=0.1, fraction=0.4), lr=1e-2)
    back.load_state_dict(torch_opt.state_dict())
    for param, mask in opt._soft_masks.items():
        assert torch.equal(back._soft_masks[param], mask)


def test_masks_of_params_that_never_stepped_need_stripping_for_torch():
    model = _model()
    opt = _masked(model)
    saved = opt.state_dict()  # before any step: entries that hold only a mask
    assert saved["state"][0] == {"soft_mask": opt._soft_masks[model[0].weight]}
    torch_opt = torch.optim.AdamW(selopt.param_groups(model, weight_decay=0.1, fraction=0.4), lr=1e-2)
    with pytest.raises(KeyError, match="step"):
        torch_opt.load_state_dict(saved)  # why strip_soft_masks exists
    torch_opt = torch.optim.AdamW(selopt.param_groups(model, weight_decay=0.1, fraction=0.4), lr=1e-2)
    torch_opt.load_state_dict(selopt.strip_soft_masks(saved))
    _train(model, torch_opt, 1)
    assert "soft_mask" in saved["state"][0]  # stripping copies
    # selopt itself loads mask-only entries: the masks come back, the params start fresh.
    again = _masked(_model())
    again.load_state_dict(saved)
    assert len(again._soft_masks) == 2 and not any(again.state.values())


def test_complex_full_shape_mask_round_trips():
    param = torch.nn.Parameter(torch.randn(3, 2, dtype=torch.complex64))
    opt = selopt.AdamW([param], lr=1e-2)
    mask = torch.rand(3, 2)
    opt.set_soft_mask(param, mask)
    saved = opt.state_dict()
    assert torch.equal(saved["state"][0]["soft_mask"], mask)
    other = selopt.AdamW([param], lr=1e-2)
    other.load_state_dict(saved)
    assert torch.equal(other._soft_masks[param], opt._soft_masks[param])


def test_a_bad_mask_in_a_state_dict_changes_nothing():
    model = _model()
    opt = _masked(model)
    _train(model, opt, 1)
    saved = opt.state_dict()
    target = _masked(_model())
    before = copy.deepcopy(target.state_dict())
    for bad, error in ((torch.ones(4), ValueError), (torch.full((5,), 2.0), ValueError), ("mask", TypeError)):
        broken = {**saved, "state": {**saved["state"], 0: {**saved["state"][0], "soft_mask": bad}}}
        with pytest.raises(error, match=r"state_dict\['state'\]\[0\]\['soft_mask'\]"):
            target.load_state_dict(broken)
        after = target.state_dict()
        assert after["state"].keys() == before["state"].keys()
        assert all(torch.equal(after["state"][k]["soft_mask"], before["state"][k]["soft_mask"]) for k in after["state"])


def test_a_state_dict_without_masks_keeps_the_attached_ones():
    model = _model()
    torch_opt = torch.optim.AdamW(selopt.param_groups(model, weight_decay=0.1, fraction=0.4), lr=1e-2)
    _train(model, torch_opt, 1)
    opt = _masked(model)
    attached = dict(opt._soft_masks)
    opt.load_state_dict(torch_opt.state_dict())
    assert opt._soft_masks.keys() == attached.keys()
