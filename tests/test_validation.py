"""Bad input is refused with an error that names the argument, before any state changes."""

import copy
import re
from decimal import Decimal

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
    # torch.optim.AdamW's own refusals: its exception type and its words, then selopt's naming the argument.
    ("lr", -1e-3, ValueError, r"^Invalid learning rate: -0.001 \(lr must be >= 0\)$"),
    ("lr", "0.1", TypeError, r"^'<=' not supported between instances of 'float' and 'str' \(lr must be a real number"),
    ("eps", -1e-8, ValueError, r"^Invalid epsilon value: -1e-08 \(eps must be >= 0\)$"),
    ("weight_decay", -0.1, ValueError, r"^Invalid weight_decay value: -0.1 \(weight_decay must be >= 0\)$"),
    ("betas", (1.0, 0.999), ValueError, r"^Invalid beta parameter at index 0: 1.0 \(betas\[0\] must be in \[0, 1\)\)$"),
    ("betas", (0.9, -0.1), ValueError, r"^Invalid beta parameter at index 1: -0.1 \(betas\[1\] must be in \[0, 1\)\)$"),
    ("betas", (0.9,), IndexError,
     r"^tuple index out of range \(betas must be a pair \(beta1, beta2\), got \(0.9,\)\)$"),
    ("betas", 0.9, TypeError, r"^'float' object is not subscriptable \(betas must be a pair"),
    ("betas", (0.9, 0.99, 0.5), ValueError, r"^too many values to unpack \(expected 2\) \(betas must be a pair"),
    ("betas", (False, 0.999), ValueError, r"^betas must be either both floats or both Tensors"),
    ("lr", torch.tensor([1e-3, 1e-3]), ValueError, r"^Tensor lr must be 1-element, got shape \(2,\)$"),
    ("lr", torch.tensor(-1.0), ValueError, r"^Invalid learning rate: -1.0 \(lr must be >= 0\)$"),
    ("lr", torch.tensor(1e-3, dtype=torch.complex64), NotImplementedError,
     r"not implemented for 'ComplexFloat' \(lr must be real, got torch.complex64\)$"),
    ("eps", torch.tensor([1e-8, 1e-8]), RuntimeError,
     r"^Boolean value of Tensor with more than one value is ambiguous: Tensor eps must be 1-element"),
    ("betas", (torch.tensor(0.9), 0.999), ValueError, r"^betas must be either both floats or both Tensors"),
    ("betas", (torch.tensor(0.9), torch.tensor([0.9, 0.99])), RuntimeError,
     r"^Boolean value of Tensor with more than one value is ambiguous: Tensor betas\[1\] must be 1-element"),
    ("betas", (torch.tensor(0.9), torch.tensor(1.0)), ValueError,
     r"^Invalid beta parameter at index 1: 1.0 \(betas\[1\] must be in \[0, 1\)\)$"),
    # Values torch takes by their truth or their comparison with a float, and selopt refuses rather than guess.
    ("lr", Decimal("0.1"), TypeError, r"^lr must be a real number or a one-element tensor, got Decimal$"),
    ("amsgrad", "no", TypeError, r"^amsgrad must be a bool \(or 0, 1, or None for False, as torch.optim.AdamW"),
    ("maximize", 2, TypeError, r"^maximize must be a bool \(or 0, 1, or None for False"),
    ("capturable", "no", TypeError, r"^capturable must be a bool"),
    ("foreach", "yes", TypeError, r"^foreach must be None, True or False, got 'yes'$"),
    ("fused", 2, TypeError, r"^fused must be None, True or False, got 2$"),
    ("differentiable", True, NotImplementedError, r"differentiable=True is not supported"),
    # selopt's own options.
    ("fraction", 0.0, ValueError, r"fraction must be in \(0, 1\], got 0.0"),
    ("fraction", 1.5, ValueError, r"fraction must be in \(0, 1\], got 1.5"),
    ("fraction", -0.2, ValueError, r"fraction must be in \(0, 1\], got -0.2"),
    ("fraction", float("nan"), ValueError, r"fraction must be in \(0, 1\], got nan"),
    ("fraction", True, TypeError, r"fraction must be a real number in \(0, 1\], got bool"),
    ("block_size", 0, ValueError, r"block_size must be None .* positive power of two"),
    ("block_size", 100, ValueError, r"block_size must be"),
    ("block_size", -256, ValueError, r"block_size must be"),
    ("block_size", 256.0, ValueError, r"block_size must be"),
    ("block_size", True, ValueError, r"block_size must be"),
    ("decay", "some", ValueError, r"decay must be one of \('all', 'selected'\)"),
    ("soft_mask_mode", "loss", ValueError, r"soft_mask_mode must be one of"),
    ("backend", "cuda", ValueError, r"backend must be one of \('auto', 'triton', 'torch'\)"),
    ("moment_dtype", torch.float16, ValueError, r"moment_dtype must be one of"),
    ("stochastic_rounding", None, TypeError, r"stochastic_rounding must be a bool"),
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


IN_PLACE_CHANGES = [
    # (the group's options, how the value is changed in place between steps, the error)
    (dict(lr=torch.tensor(0.1)), lambda group: group["lr"].fill_(-1.0),
     r"^Invalid learning rate: -1.0 \(lr must be >= 0\)$"),
    (dict(lr=torch.tensor(0.1)), lambda group: group["lr"].fill_(float("nan")), r"^Invalid learning rate: nan"),
    (dict(betas=(torch.tensor(0.9), torch.tensor(0.999))), lambda group: group["betas"][1].fill_(1.0),
     r"^Invalid beta parameter at index 1: 1.0"),
    (dict(betas=[0.9, 0.999]), lambda group: group["betas"].__setitem__(0, -0.5),
     r"^Invalid beta parameter at index 0: -0.5"),
    (dict(eps=torch.tensor(1e-8)), lambda group: group["eps"].fill_(-1.0), r"^Invalid epsilon value: -1.0"),
    (dict(weight_decay=torch.tensor(0.1)), lambda group: group["weight_decay"].fill_(-0.1),
     r"^Invalid weight_decay value: -0.1"),
]


@pytest.mark.parametrize(("options", "change", "message"), IN_PLACE_CHANGES,
                         ids=["lr-negative", "lr-nan", "tensor-beta", "list-beta", "eps", "weight-decay"])
def test_a_value_changed_in_place_is_refused_at_the_next_step_before_anything_moves(options, change, message):
    # torch.optim.AdamW checks its values only when the optimizer is made, and steps on with these.
    # selopt reads a value that can change in place (a CPU tensor, a list) again at each step.
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = selopt.MoFO(params, fraction=0.5)
    opt.param_groups[0].update(options)  # a list of betas stays a list in the group
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    change(opt.param_groups[0])
    snap = snapshot(params, opt)
    with pytest.raises(ValueError, match=message):
        opt.step()
    assert_unchanged(params, opt, snap)


def test_a_device_tensor_lr_is_not_read_back_and_host_read_tensors_are_refused_with_capturable():
    # A meta tensor stands in for a CUDA one. Reading a device lr would sync the host at every step:
    # it is left to the device (the kernels read it there), so its value is not checked.
    params = [torch.nn.Parameter(torch.zeros(3))]
    selopt.AdamW(params, lr=torch.tensor(-1.0, device="meta"))
    with pytest.raises(ValueError, match=r"^Invalid learning rate: -1.0"):
        selopt.AdamW(params, lr=torch.tensor(-1.0))
    # betas, eps and weight_decay tensors are read on the host at each step, which a graph capture cannot do.
    for name, value in [("eps", torch.tensor(1e-8, device="meta")), ("weight_decay", torch.tensor(0.1, device="meta")),
                        ("betas", (torch.tensor(0.9, device="meta"), torch.tensor(0.99, device="meta")))]:
        shown = "betas[0]" if name == "betas" else name
        with pytest.raises(ValueError, match=rf"^{re.escape(shown)} is a tensor on meta: selopt reads it on the host"):
            selopt.AdamW(params, capturable=True, **{name: value})


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


def test_auto_backend_uses_the_fused_torch_implementation_on_cpu():
    chosen = functional.choose_implementation(torch.device("cpu"), torch.float32, torch.float32, sharded=False,
                                              options=AdamWOptions())
    assert chosen is functional.FUSED
