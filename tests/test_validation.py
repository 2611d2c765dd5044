"""Bad input is refused with an error that names the argument, before any state changes."""

import copy

import pytest
import torch

import selopt
from selopt import functional
from selopt.options import AdamWOptions


def snapshot(params, opt):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def assert_unchanged(params, opt, snap):
    old_params, old_state = snap
    for p, old in zip(params, old_params):
        assert torch.equal(p, old)
    state = opt.state_dict()["state"]
    assert state.keys() == old_state["state"].keys()
    for key, entry in old_state["state"].items():
        for name, value in entry.items():
            assert torch.equal(state[key][name], value)


BAD_OPTIONS = [
    ("lr", -1e-3, ValueError, r"lr must be >= 0"),
    ("lr", "0.1", TypeError, r"lr must be a real number >= 0, got str"),
    ("eps", -1e-8, ValueError, r"eps must be >= 0"),
    ("weight_decay", -0.1, ValueError, r"weight_decay must be >= 0"),
    ("betas", (1.0, 0.999), ValueError, r"betas\[0\] must be in \[0, 1\), got 1.0"),
    ("betas", (0.9, -0.1), ValueError, r"betas\[1\] must be in \[0, 1\), got -0.1"),
    ("betas", (0.9,), TypeError, r"betas must be a pair"),
    ("fraction", 0.0, ValueError, r"fraction must be in \(0, 1\], got 0.0"),
    ("fraction", 1.5, ValueError, r"fraction must be in \(0, 1\], got 1.5"),
    ("fraction", -0.2, ValueError, r"fraction must be in \(0, 1\], got -0.2"),
    ("fraction", float("nan"), ValueError, r"fraction must be in \(0, 1\], got nan"),
    ("block_size", 0, ValueError, r"block_size must be None .* positive power of two"),
    ("block_size", 100, ValueError, r"block_size must be"),
    ("block_size", -256, ValueError, r"block_size must be"),
    ("block_size", 256.0, ValueError, r"block_size must be"),
    ("block_size", True, ValueError, r"block_size must be"),
    ("decay", "some", ValueError, r"decay must be one of \('all', 'selected'\)"),
    ("soft_mask_mode", "loss", ValueError, r"soft_mask_mode must be one of"),
    ("backend", "cuda", ValueError, r"backend must be one of \('auto', 'triton', 'torch'\)"),
    ("moment_dtype", torch.float16, ValueError, r"moment_dtype must be one of"),
    ("amsgrad", "yes", TypeError, r"amsgrad must be a bool"),
    ("maximize", 1, TypeError, r"maximize must be a bool"),
    ("stochastic_rounding", None, TypeError, r"stochastic_rounding must be a bool"),
    ("capturable", "no", TypeError, r"capturable must be a bool"),
    ("foreach", 1, TypeError, r"foreach must be None, True or False"),
    ("fused", "yes", TypeError, r"fused must be None, True or False"),
    ("differentiable", True, NotImplementedError, r"differentiable=True is not supported"),
    ("lr", torch.tensor([1e-3, 1e-3]), ValueError, r"lr as a tensor must have exactly one element, got shape \(2,\)"),
    ("lr", torch.tensor(-1.0), ValueError, r"lr must be >= 0, got -1.0"),
    ("betas", (torch.tensor(0.9), 0.999), ValueError, r"betas must be both numbers or both tensors"),
    ("betas", (torch.tensor(0.9), torch.tensor([0.9, 0.99])), ValueError, r"betas\[1\] as a tensor must have exac"),
    ("betas", (torch.tensor(0.9), torch.tensor(1.0)), ValueError, r"betas\[1\] must be in \[0, 1\), got 1.0"),
]


@pytest.mark.parametrize(("name", "value", "error", "message"), BAD_OPTIONS, ids=lambda x: repr(x)[:20])
def test_bad_constructor_argument_is_refused(name, value, error, message):
    with pytest.raises(error, match=message):
        selopt.MoFO([torch.nn.Parameter(torch.zeros(3))], **{name: value})


@pytest.mark.parametrize(("name", "value", "error", "message"), BAD_OPTIONS[:6], ids=lambda x: repr(x)[:20])
def test_bad_param_group_is_refused_and_not_added(name, value, error, message):
    opt = selopt.AdamW([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(error, match=message):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], name: value})
    assert len(opt.param_groups) == 1


def test_a_group_asking_for_coupled_weight_decay_is_refused():
    # torch.optim.AdamW steps such a group as Adam with an L2 penalty; selopt only has AdamW's decay.
    opt = selopt.AdamW([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match=r"decoupled_weight_decay must be True .*, got False"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "decoupled_weight_decay": False})
    assert len(opt.param_groups) == 1


def test_integer_params_are_refused():
    with pytest.raises(TypeError, match="floating-point"):
        selopt.AdamW([torch.zeros(3, dtype=torch.int64)])


def trained_pair():
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = selopt.MoFO(params, lr=0.1, fraction=0.5)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in params:
        p.grad = torch.randn_like(p)
    return params, opt


def test_group_made_invalid_after_construction_fails_the_step_before_anything_moves():
    params, opt = trained_pair()
    opt.param_groups[0]["fraction"] = 2.0
    snap = snapshot(params, opt)
    with pytest.raises(ValueError, match="fraction"):
        opt.step()
    assert_unchanged(params, opt, snap)


def test_sparse_gradient_raises_and_changes_nothing():
    params, opt = trained_pair()
    params[1].grad = params[1].grad.to_sparse()  # the dense one comes first in the group
    snap = snapshot(params, opt)
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert_unchanged(params, opt, snap)


def test_found_inf_skips_the_whole_step_without_touching_anything():
    params, opt = trained_pair()
    snap = snapshot(params, opt)
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert_unchanged(params, opt, snap)
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    assert opt.state[params[0]]["step"].item() == 2
    assert not torch.equal(params[0], snap[0][0])


def test_grad_scaler_end_to_end_skips_inf_steps():
    model = torch.nn.Linear(4, 2)
    opt = selopt.MoFO(model.parameters(), lr=1e-2, fraction=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for poison in (False, True, False):
        opt.zero_grad()
        scaler.scale(model(torch.randn(3, 4)).sum()).backward()
        if poison:
            model.weight.grad[0, 0] = float("inf")
            before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        if poison:
            assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert opt.state[model.weight]["step"].item() == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_soft_mask_is_checked():
    layer = torch.nn.Linear(3, 4)
    opt = selopt.MoFO(layer.parameters())
    with pytest.raises(ValueError, match=r"mask must have shape \(4,\) \(per row\) or \(4, 3\)"):
        opt.set_soft_mask(layer.weight, torch.ones(3))
    with pytest.raises(ValueError, match=r"mask values must be in \[0, 1\]"):
        opt.set_soft_mask(layer.weight, torch.full((4,), 1.5))
    with pytest.raises(TypeError, match="floating-point tensor"):
        opt.set_soft_mask(layer.weight, torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="not in this optimizer"):
        opt.set_soft_mask(torch.nn.Parameter(torch.zeros(4, 3)), torch.ones(4))
    opt.set_soft_mask(layer.weight, torch.ones(4))
    opt.set_soft_mask(layer.weight, None)
    assert not opt._soft_masks


def test_triton_backend_without_triton_says_how_to_install(monkeypatch):
    monkeypatch.setattr(functional, "triton_problem", lambda: "Triton is not installed: `pip install triton`")
    params, opt = trained_pair()
    opt.param_groups[0]["backend"] = "triton"
    snap = snapshot(params, opt)
    with pytest.raises(ImportError, match=r"pip install triton"):
        opt.step()
    assert_unchanged(params, opt, snap)


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(functional, "triton_problem", lambda: None)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    params, opt = trained_pair()
    opt.param_groups[0]["backend"] = "triton"
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        opt.step()


def test_auto_backend_uses_torch_on_cpu():
    chosen = functional.choose_implementation(torch.device("cpu"), torch.float32, torch.float32, sharded=False,
                                              options=AdamWOptions())
    assert chosen is functional.REFERENCE
