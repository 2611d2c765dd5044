"""torch.optim's conventions, as PyTorch's own test/test_optim.py checks them, hold for selopt.

Tests that step run on both backends; the Triton one runs on CPU tensors under
``TRITON_INTERPRET=1`` (as ``make test`` sets it), so sizes stay tiny.
"""

import copy
import importlib.util
import inspect
import io
import os

import pytest
import torch

import selopt

try:
    import numpy as np
except ImportError:  # not a dependency of selopt: the cases with NumPy numbers are skipped without it
    np = None

OPTIMIZERS = [selopt.AdamW, selopt.MoFO]
BACKENDS = [
    "torch",
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(
            not (importlib.util.find_spec("triton") and os.environ.get("TRITON_INTERPRET") == "1"),
            reason="the Triton backend runs on CPU tensors only under TRITON_INTERPRET=1 (with Triton installed)",
        ),
    ),
]


def make_params(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype)) for shape in ((5, 3), (4,))]


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def train(opt, params, steps, seed):
    """``steps`` steps on gradients drawn from ``seed``, the same for every optimizer given the same seed."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()


def through_bytes(state_dict, **load_options):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, **load_options)


def assert_equal_nested(a, b):
    """Equal structure, keys and values; tensors equal in dtype, shape and value."""
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_equal_nested(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_equal_nested(x, y)
    else:
        assert a == b


def assert_same_params(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_param_groups_given_as_generators_are_kept_and_trained(optimizer_class):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    opt = optimizer_class([{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 0.1}])
    reference = torch.optim.AdamW([{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 0.1}])
    assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in reference.param_groups] == [2, 2]
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


# --- The signature -----------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_signature_is_torch_adamw_s_followed_by_keyword_only_selopt_options(optimizer_class):
    theirs = list(inspect.signature(torch.optim.AdamW).parameters.values())
    ours = list(inspect.signature(optimizer_class).parameters.values())
    assert [(p.name, p.kind, p.default) for p in ours[: len(theirs)]] == [(p.name, p.kind, p.default) for p in theirs]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours[len(theirs):])


def test_mofo_signature_is_adamw_s_with_its_own_fraction():
    adamw = inspect.signature(selopt.AdamW).parameters
    mofo = inspect.signature(selopt.MoFO).parameters
    assert list(mofo) == list(adamw)
    assert mofo["fraction"].default == 0.15
    assert all(mofo[name] == adamw[name] for name in adamw if name != "fraction")


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_torch_adamw_call_with_positional_amsgrad_and_every_keyword_works(optimizer_class):
    params = make_params()
    opt = optimizer_class(params, 1e-2, (0.8, 0.99), 1e-6, 0.0, True,
                          maximize=True, foreach=False, capturable=False, differentiable=False, fused=False)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"], group["amsgrad"]) == (
        1e-2, (0.8, 0.99), 1e-6, 0.0, True)
    assert (group["maximize"], group["foreach"], group["capturable"], group["fused"]) == (True, False, False, False)
    train(opt, params, 1, seed=0)
    assert "max_exp_avg_sq" in opt.state[params[0]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("foreach", "fused"), [(None, None), (True, None), (None, True), (False, False), (True, False)]
)
def test_foreach_and_fused_are_kept_in_the_groups_and_change_nothing(foreach, fused, backend):
    params, default_params = make_params(), make_params()
    opt = selopt.MoFO(params, lr=1e-2, fraction=0.5, foreach=foreach, fused=fused, backend=backend)
    assert (opt.param_groups[0]["foreach"], opt.param_groups[0]["fused"]) == (foreach, fused)
    train(opt, params, 2, seed=1)
    train(selopt.MoFO(default_params, lr=1e-2, fraction=0.5, backend=backend), default_params, 2, seed=1)
    assert_same_params(params, default_params)


# --- Bad input: torch's own error cases, torch's exception types --------------------------------

# The cases of torch.testing._internal.common_optimizers.optim_error_inputs_func_adamw (torch 2.13),
# copied as data: importing that module needs expecttest, a test-only dependency of torch. The last
# two are its CUDA-only cases; torch raises them at construction on any device. Each case is also
# run against torch.optim.AdamW, so the data cannot drift from what torch does.
#
# Each case builds its params from two fresh (1, 1) parameters: torch's add_param_group writes into
# the group dicts it is given, so no two constructions may share them.
TORCH_ERROR_INPUTS = [
    ("invalid param type", lambda a, b: a, {}, TypeError,
     "params argument given to the optimizer should be an iterable of Tensors or dicts"),
    ("duplicate params across groups", lambda a, b: [{"params": a}, {"params": a}], {}, ValueError,
     "some parameters appear in more than one parameter group"),
    ("Tensor lr must be 1-element", lambda a, b: [a], dict(lr=torch.tensor([0.001, 0.001])), ValueError,
     "Tensor lr must be 1-element"),
    ("all params with or without names", lambda a, b: [("weight", a), b], {}, ValueError,
     "all optimizer params should be with/without names. Some param names are missing"),
    ("all groups with or without names",
     lambda a, b: [{"params": [a], "lr": 1e-2}, {"params": [("weight", b)]}], {}, ValueError,
     "all optimizer param groups should be with/without names."),
    ("beta1 in [0, 1)", lambda a, b: [a], dict(lr=1e-2, betas=(1.0, 0.0)), ValueError,
     "Invalid beta parameter at index 0: 1.0"),
    ("weight_decay >= 0", lambda a, b: [a], dict(lr=1e-2, weight_decay=-1), ValueError,
     "Invalid weight_decay value: -1"),
    ("tensor lr with foreach, not capturable", lambda a, b: [a], dict(lr=torch.tensor(0.001), foreach=True),
     ValueError, "lr as a Tensor is not supported for capturable=False and foreach=True"),
    ("betas float and tensor", lambda a, b: [a], dict(lr=1e-2, betas=(0.9, torch.tensor(0.99))), ValueError,
     "betas must be either both floats or both Tensors"),
    ("betas tensor and float", lambda a, b: [a], dict(lr=1e-2, betas=(torch.tensor(0.9), 0.99)), ValueError,
     "betas must be either both floats or both Tensors"),
    ("tensor betas with foreach, not capturable", lambda a, b: [a],
     dict(lr=1e-2, betas=(torch.tensor(0.9), torch.tensor(0.99)), foreach=True), ValueError,
     r"betas\[0\] as a Tensor is not supported for capturable=False and foreach=True"),
    ("fused and foreach", lambda a, b: [a], dict(foreach=True, fused=True), RuntimeError,
     "`fused` and `foreach` cannot be `True` together"),
    ("fused and differentiable", lambda a, b: [a], dict(fused=True, differentiable=True), RuntimeError,
     "`fused` does not support `differentiable`"),
]

# torch.optim.Adam.__init__'s other refusals (torch/optim/adam.py), which PyTorch's tests do not list, and
# the errors Python raises for it where it indexes or compares a value that does not fit.
TORCH_INIT_ERROR_INPUTS = [
    ("lr >= 0", lambda a, b: [a], dict(lr=-1e-3), ValueError, "Invalid learning rate: -0.001"),
    ("lr nan", lambda a, b: [a], dict(lr=float("nan")), ValueError, "Invalid learning rate: nan"),
    ("tensor lr >= 0", lambda a, b: [a], dict(lr=torch.tensor(-1.0)), ValueError, "Invalid learning rate: -1.0"),
    ("eps >= 0", lambda a, b: [a], dict(eps=-1e-8), ValueError, "Invalid epsilon value: -1e-08"),
    ("beta2 in [0, 1)", lambda a, b: [a], dict(betas=(0.9, 1.0)), ValueError, "Invalid beta parameter at index 1: 1.0"),
    ("betas of one", lambda a, b: [a], dict(betas=(0.9,)), IndexError, "tuple index out of range"),
    ("betas not a pair", lambda a, b: [a], dict(betas=0.9), TypeError, "'float' object is not subscriptable"),
    ("betas of bools", lambda a, b: [a], dict(betas=(False, 0.9)), ValueError,
     "betas must be either both floats or both Tensors"),
    ("lr a string", lambda a, b: [a], dict(lr="0.1"), TypeError,
     "'<=' not supported between instances of 'float' and 'str'"),
    ("eps None", lambda a, b: [a], dict(eps=None), TypeError,
     "'<=' not supported between instances of 'float' and 'NoneType'"),
    ("betas of two-element tensors", lambda a, b: [a], dict(betas=(torch.tensor([0.9, 0.9]), torch.tensor(0.99))),
     RuntimeError, "Boolean value of Tensor with more than one value is ambiguous"),
    ("complex tensor lr", lambda a, b: [a], dict(lr=torch.tensor(1e-3 + 0j)), NotImplementedError,
     "not implemented for 'ComplexFloat'"),
]


def fresh_pair():
    return torch.nn.Parameter(torch.randn(1, 1)), torch.nn.Parameter(torch.randn(1, 1))


@pytest.mark.parametrize(
    ("desc", "make_params", "kwargs", "error", "words"), TORCH_ERROR_INPUTS + TORCH_INIT_ERROR_INPUTS,
    ids=[case[0] for case in TORCH_ERROR_INPUTS + TORCH_INIT_ERROR_INPUTS],
)
@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_torch_error_inputs_raise_torch_s_exception_type_and_words(optimizer_class, desc, make_params, kwargs,
                                                                  error, words):
    # As PyTorch's TestOptimRenewed.test_errors checks them: the type, and the words found in the message.
    for cls in (torch.optim.AdamW, optimizer_class):
        with pytest.raises(error, match=words):
            cls(make_params(*fresh_pair()), **kwargs)


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_duplicate_params_in_a_group_warn_as_in_torch(optimizer_class):
    for cls in (torch.optim.AdamW, optimizer_class):
        param, _ = fresh_pair()
        with pytest.warns(UserWarning, match="duplicate parameters"):
            cls([param, param])


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_differentiable_true_is_refused_by_name(optimizer_class):
    with pytest.raises(NotImplementedError, match="differentiable=True is not supported"):
        optimizer_class(make_params(), differentiable=True)


def test_capturable_refuses_a_device_param_on_the_torch_reference_before_anything_changes():
    # A meta tensor stands in for a CUDA one: any non-CPU param on the reference is refused.
    cpu_param, meta_param = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3, device="meta"))
    cpu_param.grad, meta_param.grad = torch.ones(3), torch.ones(3, device="meta")
    opt = selopt.AdamW([cpu_param, meta_param], capturable=True, backend="torch")
    with pytest.raises(ValueError, match=r"capturable=True, but a param on meta steps on the torch reference"):
        opt.step()
    assert not opt.state and torch.equal(cpu_param.detach(), torch.ones(3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_capturable_on_cpu_params_steps_as_without_it(backend):
    params, plain = make_params(), make_params()
    train(selopt.MoFO(params, lr=1e-2, fraction=0.5, capturable=True, backend=backend), params, 2, seed=1)
    train(selopt.MoFO(plain, lr=1e-2, fraction=0.5, backend=backend), plain, 2, seed=1)
    assert_same_params(params, plain)


# --- What torch accepts -------------------------------------------------------------------------

# Each case: what torch.optim.AdamW accepts, the plain value selopt computes with (the same number as a
# Python int or float, a bool flag), and whether torch steps on it bit for bit as on the plain value
# (None: a selopt option, which torch does not have). NumPy numbers are what a config or a scheduler
# computed with NumPy hands over.
NUMPY = pytest.mark.skipif(np is None, reason="NumPy is not installed")
ACCEPTED = [
    pytest.param(lambda: (dict(lr=np.float32(1e-2)), dict(lr=float(np.float32(1e-2))), False),
                 id="lr=np.float32", marks=NUMPY),
    pytest.param(lambda: (dict(lr=np.int64(1)), dict(lr=1), True), id="lr=np.int64", marks=NUMPY),
    pytest.param(lambda: (dict(lr=True), dict(lr=1), True), id="lr=True"),
    pytest.param(lambda: (dict(eps=np.float32(1e-6)), dict(eps=float(np.float32(1e-6))), True),
                 id="eps=np.float32", marks=NUMPY),
    pytest.param(lambda: (dict(weight_decay=np.float32(0.1)), dict(weight_decay=float(np.float32(0.1))), False),
                 id="weight_decay=np.float32", marks=NUMPY),
    pytest.param(lambda: (dict(betas=(np.float64(0.8), np.float64(0.99))), dict(betas=(0.8, 0.99)), True),
                 id="betas=np.float64", marks=NUMPY),
    pytest.param(lambda: (dict(betas=[0.8, 0.99]), dict(betas=(0.8, 0.99)), True), id="betas=list"),
    pytest.param(lambda: (dict(amsgrad=1), dict(amsgrad=True), True), id="amsgrad=1"),
    pytest.param(lambda: (dict(amsgrad=None), dict(amsgrad=False), True), id="amsgrad=None"),
    pytest.param(lambda: (dict(maximize=0), dict(maximize=False), True), id="maximize=0"),
    pytest.param(lambda: (dict(maximize=1), dict(maximize=True), True), id="maximize=1"),
    pytest.param(lambda: (dict(capturable=None), dict(capturable=False), True), id="capturable=None"),
    pytest.param(lambda: (dict(foreach=0, fused=0), dict(foreach=False, fused=False), True), id="foreach=fused=0"),
    pytest.param(lambda: (dict(lr=torch.tensor(1)), dict(lr=torch.tensor(1.0, dtype=torch.float64)), False),
                 id="lr=int64-tensor"),
    pytest.param(lambda: (dict(lr=torch.tensor(1e-2, dtype=torch.float64)),
                          dict(lr=torch.tensor(1e-2, dtype=torch.float64).item()), True), id="lr=fp64-tensor"),
    pytest.param(lambda: (dict(lr=torch.tensor(1e-2)), dict(lr=torch.tensor(1e-2).item()), False),
                 id="lr=fp32-tensor"),
    pytest.param(lambda: (dict(eps=torch.tensor(1e-6)), dict(eps=torch.tensor(1e-6).item()), True), id="eps=tensor"),
    pytest.param(lambda: (dict(weight_decay=torch.tensor(0.1)), dict(weight_decay=torch.tensor(0.1).item()), False),
                 id="weight_decay=tensor"),
    pytest.param(lambda: (dict(betas=(torch.tensor(0), torch.tensor(0))), dict(betas=(0.0, 0.0)), False),
                 id="betas=int-tensors"),
    pytest.param(lambda: (dict(block_size=np.int64(4), fraction=0.5), dict(block_size=4, fraction=0.5), None),
                 id="block_size=np.int64", marks=NUMPY),
    pytest.param(lambda: (dict(fraction=np.float32(0.5)), dict(fraction=0.5), None), id="fraction=np.float32",
                 marks=NUMPY),
]


def assert_same_group_value(ours, theirs):
    """A group value kept as torch keeps it: the same object, or an equal one of the same type."""
    if isinstance(theirs, tuple):
        assert type(ours) is tuple and len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            assert_same_group_value(a, b)
    elif isinstance(theirs, torch.Tensor):
        assert ours is theirs or (ours.dtype == theirs.dtype and torch.equal(ours, theirs))
    else:
        assert type(ours) is type(theirs) and ours == theirs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ACCEPTED)
def test_what_torch_accepts_is_accepted_kept_in_the_group_and_steps_as_its_plain_value(case, backend):
    given, plain, _ = case()
    params, plain_params = make_params(), make_params()
    opt = selopt.MoFO(params, **{"lr": 1e-2, "fraction": 0.5, "weight_decay": 0.1, **given}, backend=backend)
    if "fraction" not in given and "block_size" not in given:  # torch's options: its group holds the same
        theirs = torch.optim.AdamW(make_params(), **{"lr": 1e-2, "weight_decay": 0.1, **given}).param_groups[0]
        for key in given:
            assert_same_group_value(opt.param_groups[0][key], theirs[key])
    train(opt, params, 3, seed=3)
    train(selopt.MoFO(plain_params, **{"lr": 1e-2, "fraction": 0.5, "weight_decay": 0.1, **plain}, backend=backend),
          plain_params, 3, seed=3)
    assert_same_params(params, plain_params)


def ulps_apart(a, b):
    """How many units in the last place of ``a``'s dtype, at its magnitude, ``a`` and ``b`` are apart."""
    spacing = torch.nextafter(a.abs(), torch.tensor(float("inf"), dtype=a.dtype)) - a.abs()
    return ((a.double() - b.double()).abs() / spacing.double()).max().item()


@pytest.mark.parametrize("case", ACCEPTED)
def test_what_torch_accepts_steps_as_torch_steps_on_it(case):
    # Bit for bit, except where torch does the step's scalar arithmetic (lr / bias_correction1,
    # 1 - lr * weight_decay, 1 - beta) in the value's own precision (an fp32 or integer tensor, a NumPy
    # float32), which selopt does in double: then a few fp32 ulps apart (README, "Where selopt differs").
    given, _, exact = case()
    if exact is None:
        pytest.skip("a selopt option: torch.optim.AdamW has no such argument")
    ours, theirs = make_params(), make_params()
    train(selopt.AdamW(ours, **{"lr": 1e-2, "weight_decay": 0.1, **given}, backend="torch"), ours, 10, seed=4)
    train(torch.optim.AdamW(theirs, **{"lr": 1e-2, "weight_decay": 0.1, "foreach": False, **given}), theirs, 10,
          seed=4)
    for p, q in zip(ours, theirs):
        if exact:
            assert torch.equal(p, q)
        else:
            assert ulps_apart(p.detach(), q.detach()) <= 4


@pytest.mark.skipif(np is None, reason="NumPy is not installed")
def test_a_scheduler_setting_numpy_learning_rates_steps_as_with_torch():
    # LambdaLR multiplies the base lr by what the lambda returns: a NumPy float32 here, as torch keeps it.
    def schedule(epoch):
        return np.float32(0.5) ** epoch

    ours, theirs = make_params(), make_params()
    opts = [selopt.AdamW(ours, lr=1e-2, backend="torch"), torch.optim.AdamW(theirs, lr=1e-2, foreach=False)]
    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, schedule) for opt in opts]
    gen = torch.Generator().manual_seed(5)
    for _ in range(4):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        for opt, scheduler in zip(opts, schedulers):
            opt.step()
            scheduler.step()
        lrs = [opt.param_groups[0]["lr"] for opt in opts]
        assert type(lrs[0]) is type(lrs[1]) is np.float32 and lrs[0] == lrs[1]
    for p, q in zip(ours, theirs):  # torch computes with the fp32 lr in fp32, selopt in double
        assert ulps_apart(p.detach(), q.detach()) <= 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_values_changed_in_place_step_as_the_numbers_they_now_hold(backend):
    # As a scheduler of tensor values does it (torch's own LRScheduler fills a tensor lr in place).
    def options(lr, beta1, beta2, eps, weight_decay):
        return dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)

    before, after = (1e-2, 0.9, 0.99, 1e-8, 0.1), (5e-3, 0.5, 0.9, 1e-3, 0.2)
    values = [torch.tensor(x) for x in before]
    params, numbers = make_params(), make_params()
    opts = [selopt.MoFO(params, fraction=0.5, backend=backend, **options(*values)),
            selopt.MoFO(numbers, fraction=0.5, backend=backend, **options(*(v.item() for v in values)))]
    train(opts[0], params, 2, seed=6)
    train(opts[1], numbers, 2, seed=6)
    for value, new in zip(values, after):
        value.fill_(new)
    opts[1].param_groups[0].update(options(*(v.item() for v in values)))
    train(opts[0], params, 2, seed=7)
    train(opts[1], numbers, 2, seed=7)
    assert_same_params(params, numbers)


def test_a_cpu_tensor_lr_changed_in_place_makes_new_options_so_no_stale_launch_is_replayed():
    # Launches for params on another device take a CPU lr read on the host when they are prepared; the
    # optimizer replays them only while its options are the same object.
    from selopt.options import AdamWOptions

    lr = torch.tensor(0.1)
    group = AdamWOptions(lr=lr).group_defaults()
    options = AdamWOptions.from_group(group)
    assert options.of(group) is options
    lr.fill_(0.2)
    changed = options.of(group)
    assert changed is not options and changed.of(group) is changed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cpu_tensor_lr_changed_in_place_steps_cuda_params_with_its_new_value():
    lr = torch.tensor(1e-2)
    params = [torch.nn.Parameter(p.detach().cuda()) for p in make_params()]
    numbers = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opts = [selopt.MoFO(params, lr=lr, fraction=0.5, backend="triton"),
            selopt.MoFO(numbers, lr=1e-2, fraction=0.5, backend="triton")]
    for step in range(4):
        if step == 2:
            lr.fill_(5e-3)
            opts[1].param_groups[0]["lr"] = lr.item()
        for p, q in zip(params, numbers):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        for opt in opts:
            opt.step()
    assert_same_params(params, numbers)


# --- Tensor hyper-parameters --------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_tensor_betas_step_as_the_numbers_they_hold(optimizer_class, backend):
    betas = (torch.tensor([0.8]), torch.tensor(0.99))
    params, numbers = make_params(), make_params()
    opt = optimizer_class(params, lr=1e-2, betas=betas, backend=backend)
    assert [b.shape for b in opt.param_groups[0]["betas"]] == [torch.Size([])] * 2  # squeezed, as torch does
    train(opt, params, 3, seed=2)
    train(optimizer_class(numbers, lr=1e-2, betas=tuple(b.item() for b in betas), backend=backend), numbers, 3, seed=2)
    assert_same_params(params, numbers)


def test_tensor_betas_state_dict_loads_into_torch_adamw_and_steps_alike():
    params, theirs = make_params(), make_params()
    opt = selopt.AdamW(params, lr=1e-2, betas=(torch.tensor(0.8), torch.tensor(0.99)))
    train(opt, params, 2, seed=0)
    torch_opt = torch.optim.AdamW(theirs, foreach=False)
    torch_opt.load_state_dict(through_bytes(opt.state_dict()))
    for p, q in zip(params, theirs):
        q.data.copy_(p.detach())
    train(opt, params, 2, seed=1)
    train(torch_opt, theirs, 2, seed=1)
    for p, q in zip(params, theirs):  # torch computes 1 - beta as a fp32 tensor, selopt in double
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# --- state_dict ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_state_dict_is_deterministic_through_load_deepcopy_and_steps(optimizer_class, backend):
    params = make_params()
    opt = optimizer_class(params, lr=1e-2, amsgrad=True, backend=backend)
    train(opt, params, 2, seed=0)
    saved = copy.deepcopy(opt.state_dict())

    # torch's test_state_dict_deterministic: a load into equal params continues identically.
    loaded_params = clone_params(params)
    loaded = optimizer_class(loaded_params, lr=0.5, backend=backend)
    loaded.load_state_dict(saved)
    assert_equal_nested(loaded.state_dict(), saved)
    copied = copy.deepcopy(opt)
    copied_params = copied.param_groups[0]["params"]
    assert_equal_nested(copied.state_dict(), saved)
    # A load of its own state dict changes nothing either.
    opt.load_state_dict(opt.state_dict())
    assert_equal_nested(opt.state_dict(), saved)

    train(opt, params, 2, seed=1)
    train(loaded, loaded_params, 2, seed=1)
    train(copied, copied_params, 2, seed=1)
    assert_same_params(loaded_params, params)
    assert_same_params(copied_params, params)
    assert_equal_nested(loaded.state_dict(), opt.state_dict())
    assert_equal_nested(copied.state_dict(), opt.state_dict())


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_deepcopy_adds_no_group_key_and_keeps_soft_masks(optimizer_class):
    params = make_params()
    opt = optimizer_class(params)
    opt.set_soft_mask(params[0], torch.full((5,), 0.5))
    copied = copy.deepcopy(opt)
    assert [list(g) for g in copied.param_groups] == [list(g) for g in opt.param_groups]
    assert copied.defaults.keys() == opt.defaults.keys()
    (copied_param, mask), = copied._soft_masks.items()
    assert copied_param is copied.param_groups[0]["params"][0] and torch.equal(mask, torch.full((5,), 0.5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_python_number_steps_load(optimizer_class, backend):
    params = make_params()
    opt = optimizer_class(params, lr=1e-2, backend=backend)
    train(opt, params, 2, seed=0)
    saved = copy.deepcopy(opt.state_dict())
    for entry in saved["state"].values():
        entry["step"] = entry["step"].item()  # as torch's test_load_nontensor_step does
    loaded_params = clone_params(params)
    loaded = optimizer_class(loaded_params, lr=1e-2, backend=backend)
    loaded.load_state_dict(saved)
    step = loaded.state[loaded_params[0]]["step"]
    assert isinstance(step, torch.Tensor) and step.dtype == torch.float32 and step.item() == 2
    train(opt, params, 2, seed=1)
    train(loaded, loaded_params, 2, seed=1)
    assert_same_params(loaded_params, params)


# Group keys a state dict of an older torch (before foreach, maximize, capturable, differentiable,
# fused and decoupled_weight_decay) or of torch's AdamW (none of selopt's keys) lacks.
SELOPT_KEYS = ["fraction", "block_size", "decay", "soft_mask_mode", "moment_dtype", "stochastic_rounding", "backend"]
NEWER_TORCH_KEYS = ["foreach", "maximize", "capturable", "differentiable", "fused", "decoupled_weight_decay"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_older_state_dicts_without_selopt_s_or_newer_torch_keys_load_with_the_defaults(optimizer_class, backend):
    params = make_params()
    opt = optimizer_class(params, lr=1e-2, fraction=0.5, backend=backend)
    train(opt, params, 2, seed=0)
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        for key in SELOPT_KEYS + NEWER_TORCH_KEYS:
            del group[key]
    for entry in old["state"].values():
        entry["step"] = int(entry["step"])  # torch < 1.12 saved an int
    loaded_params = clone_params(params)
    loaded = optimizer_class(loaded_params, lr=0.5, fraction=0.5, backend=backend)
    loaded.load_state_dict(old)
    assert_equal_nested(loaded.state_dict()["param_groups"], opt.state_dict()["param_groups"])
    train(opt, params, 2, seed=1)
    train(loaded, loaded_params, 2, seed=1)
    assert_same_params(loaded_params, params)


def test_a_torch_adam_state_dict_loads_as_adamw_as_in_torch_adamw():
    params = make_params()
    adam = torch.optim.Adam(params, weight_decay=0.1)
    train(adam, params, 1, seed=0)
    for cls in (torch.optim.AdamW, selopt.AdamW):
        opt = cls(params)
        opt.load_state_dict(adam.state_dict())
        assert opt.param_groups[0]["decoupled_weight_decay"] is True


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_state_dict_survives_torch_load_with_weights_only(optimizer_class, backend):
    params = make_params()
    opt = optimizer_class(params, lr=torch.tensor(1e-2), betas=(torch.tensor(0.8), torch.tensor(0.99)),
                          moment_dtype=torch.float32, backend=backend)
    train(opt, params, 2, seed=0)
    restored = through_bytes(opt.state_dict(), weights_only=True)
    assert_equal_nested(restored, opt.state_dict())
    loaded_params = clone_params(params)
    loaded = optimizer_class(loaded_params, backend=backend)
    loaded.load_state_dict(restored)
    train(opt, params, 1, seed=1)
    train(loaded, loaded_params, 1, seed=1)
    assert_same_params(loaded_params, params)


def test_a_differently_grouped_checkpoint_is_refused_naming_the_group_structure():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    torch_opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    torch_opt.step()
    opt = selopt.MoFO(selopt.param_groups(model, weight_decay=0.01))
    groups_before = copy.deepcopy(opt.state_dict()["param_groups"])
    with pytest.raises(ValueError, match=r"param groups differ from this optimizer's: 1 group\(s\) of \[4\] params "
                                         r"against 2 of \[2, 2\]"):
        opt.load_state_dict(torch_opt.state_dict())
    assert not opt.state
    assert_equal_nested(opt.state_dict()["param_groups"], groups_before)


def test_readme_recipe_moves_a_checkpoint_to_other_param_groups():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.randn(2, 3)).sum().backward()
        torch_opt.step()
    checkpoint = through_bytes(torch_opt.state_dict())

    # The README's recipe, as written there.
    saved_as = selopt.AdamW(model.parameters())  # the grouping the checkpoint was saved with
    saved_as.load_state_dict(checkpoint)
    opt = selopt.MoFO(selopt.param_groups(model, weight_decay=0.01), lr=2e-5)
    opt.state.update(saved_as.state)  # optimizer state is keyed by parameter, not by group

    for p in model.parameters():
        assert opt.state[p]["step"].item() == 2
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], torch_opt.state[p][key])
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    assert [opt.state[p]["step"].item() for p in model.parameters()] == [3] * 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_named_parameters_keep_their_names_through_a_load(backend):
    model = torch.nn.Linear(3, 2)
    opt = selopt.MoFO(model.named_parameters(), fraction=0.5, backend=backend)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    assert saved["param_groups"][0]["param_names"] == ["weight", "bias"]
    loaded = selopt.MoFO(model.named_parameters(), fraction=0.5, backend=backend)
    loaded.load_state_dict(through_bytes(saved))
    assert_equal_nested(loaded.state_dict(), saved)


# --- Complex parameters -------------------------------------------------------------------------


def complex_params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=dtype) for shape in ((6, 5), (7,), ())]


def train_complex(opt, params, steps, seed):
    """The same gradients for complex params and their real views, drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            real_shape = p.shape if not p.is_complex() else (*p.shape, 2)
            grad = torch.randn(real_shape, generator=gen, dtype=p.real.dtype)
            p.grad = torch.view_as_complex(grad) if p.is_complex() else grad
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize(
    "options",
    [dict(fraction=0.3), dict(fraction=0.3, block_size=4, amsgrad=True, decay="selected"), dict(maximize=True)],
    ids=["per-tensor", "blocks-amsgrad", "dense-maximize"],
)
@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_complex_params_step_as_their_real_view(optimizer_class, options, dtype, backend):
    initial = complex_params(dtype)
    complex_ = [torch.nn.Parameter(c.clone()) for c in initial]
    real = [torch.nn.Parameter(torch.view_as_real(c).clone()) for c in initial]
    opts = [optimizer_class(ps, lr=1e-2, weight_decay=0.1, backend=backend, **options) for ps in (complex_, real)]
    opts[0].set_soft_mask(complex_[0], torch.linspace(0, 1, 30).view(6, 5))
    opts[1].set_soft_mask(real[0], torch.linspace(0, 1, 30).view(6, 5, 1).expand(6, 5, 2))
    for opt, ps in zip(opts, (complex_, real)):
        train_complex(opt, ps, 3, seed=1)
    for c, r in zip(complex_, real):
        assert torch.equal(torch.view_as_real(c.detach()), r.detach())
        state_c, state_r = opts[0].state[c], opts[1].state[r]
        assert state_c["exp_avg"].dtype == dtype  # complex moments, as torch keeps them
        for key in state_r:
            expected = state_r[key]
            got = torch.view_as_real(state_c[key]) if state_c[key].is_complex() else state_c[key]
            assert torch.equal(got, expected)
    assert len(opts[0].state) == len(complex_) and not opts[0]._soft_masks.keys() - {complex_[0]}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_params_at_fraction_one_are_torch_adamw(dtype, backend):
    initial = complex_params(dtype)
    ours = [torch.nn.Parameter(c.clone()) for c in initial]
    theirs = [torch.nn.Parameter(c.clone()) for c in initial]
    options = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
    opt = selopt.AdamW(ours, backend=backend, **options)
    train_complex(opt, ours, 3, seed=1)
    train_complex(torch.optim.AdamW(theirs, foreach=False, **options), theirs, 3, seed=1)
    for p, q in zip(ours, theirs):
        if backend == "torch" or dtype == torch.complex128:  # the reference, torch's operations in torch's order
            assert torch.equal(p, q)
        else:  # the kernel rounds its fp32 arithmetic differently
            torch.testing.assert_close(p, q, rtol=4e-6, atol=1e-7)


def special_complex(dtype, swap=False):
    """Every pair of a zero of either sign, ±1, ±inf and NaN as the parts of an entry."""
    values = (0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan"))
    return torch.tensor([complex(b, a) if swap else complex(a, b) for a in values for b in values], dtype=dtype)


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_params_differ_from_torch_only_in_zero_signs_and_nan_spreading_at_the_decay(dtype, maximize):
    # torch multiplies a complex entry by the decay factor c as a complex number, (re*c - im*0) +
    # (re*0 + im*c)i: a non-finite part makes the other part NaN, and a zero part's sign can change.
    # selopt scales the two parts alone, as for any real entries. Without decay the two agree bit for bit.
    for weight_decay in (0.0, 0.1):
        ours, theirs = torch.nn.Parameter(special_complex(dtype)), torch.nn.Parameter(special_complex(dtype))
        opts = [selopt.AdamW([ours], lr=0.1, weight_decay=weight_decay, maximize=maximize, backend="torch"),
                torch.optim.AdamW([theirs], lr=0.1, weight_decay=weight_decay, maximize=maximize, foreach=False)]
        # Without decay, gradients of every kind too; with it, zero ones: the decay alone moves the entries.
        grads = [special_complex(dtype), special_complex(dtype, swap=True)] if weight_decay == 0 else [
            torch.zeros_like(ours)] * 2
        for grad in grads:
            for opt, p in zip(opts, (ours, theirs)):
                p.grad = grad.clone()
                opt.step()
        a, b = torch.view_as_real(ours.detach()), torch.view_as_real(theirs.detach())
        same = ((a == b) & (a.signbit() == b.signbit())) | (a.isnan() & b.isnan())
        if weight_decay == 0:
            assert same.all()
            continue
        zero_signs = (a == 0) & (b == 0)
        spread = b.isnan() & ~a.isnan() & ~a.isfinite().all(-1, keepdim=True)
        assert zero_signs[~same].any() and spread[~same].any()
        assert (same | zero_signs | spread).all()


def test_complex_state_dicts_move_between_torch_adamw_and_selopt():
    initial = complex_params(torch.complex128)
    ours = [torch.nn.Parameter(c.clone()) for c in initial]
    theirs = [torch.nn.Parameter(c.clone()) for c in initial]
    opt, torch_opt = selopt.AdamW(ours, lr=1e-2), torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    train_complex(opt, ours, 2, seed=1)
    train_complex(torch_opt, theirs, 2, seed=1)
    opt.load_state_dict(through_bytes(torch_opt.state_dict()))
    torch_opt.load_state_dict(through_bytes(opt.state_dict()))
    train_complex(opt, ours, 2, seed=2)
    train_complex(torch_opt, theirs, 2, seed=2)
    assert_same_params(ours, theirs)


def test_a_real_state_dict_does_not_load_into_complex_params():
    real = [torch.nn.Parameter(torch.view_as_real(c).clone()) for c in complex_params(torch.complex64)]
    opt = selopt.AdamW(real)
    train_complex(opt, real, 1, seed=0)
    saved = opt.state_dict()
    for entry in saved["state"].values():  # real moments of the complex params' shape
        entry["exp_avg"] = entry["exp_avg"][..., 0]
    complex_opt = selopt.AdamW([torch.nn.Parameter(c) for c in complex_params(torch.complex64)])
    with pytest.raises(ValueError, match=r"\['exp_avg'\] is torch.float32, but its param is torch.complex64"):
        complex_opt.load_state_dict(saved)
    assert not complex_opt.state


def test_complex_params_refuse_bf16_moments():
    with pytest.raises(ValueError, match="moment_dtype=torch.bfloat16 has no complex counterpart"):
        selopt.AdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))], moment_dtype=torch.bfloat16)


# --- Hooks and printing -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_step_hooks_fire_around_the_step(optimizer_class, backend):
    params = make_params()
    opt = optimizer_class(params, backend=backend)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", len(o.state))))
    handle = opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", len(o.state))))
    train(opt, params, 1, seed=0)
    handle.remove()
    train(opt, params, 1, seed=0)
    assert calls == [("pre", 0), ("post", 2), ("pre", 2)]


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_state_dict_hooks_fire_and_may_change_it(optimizer_class):
    opt = optimizer_class(make_params())
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("post") or {**sd, "note": 1})
    assert opt.state_dict()["note"] == 1
    assert calls == ["pre", "post"]


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_load_state_dict_hooks_fire_in_order_and_the_loaded_dict_is_what_pre_hooks_return(optimizer_class):
    params = make_params()
    source = optimizer_class(params, lr=1e-2)
    train(source, params, 1, seed=0)
    saved = source.state_dict()
    opt = optimizer_class(clone_params(params))
    calls = []

    def set_lr(o, sd):
        calls.append("set_lr")
        return {**sd, "param_groups": [{**g, "lr": 0.5} for g in sd["param_groups"]]}

    def widen(o, sd):  # called on what set_lr returned
        calls.append("widen")
        return {**sd, "param_groups": [{**g, "eps": g["lr"] * 1e-6} for g in sd["param_groups"]]}

    opt.register_load_state_dict_pre_hook(widen)
    opt.register_load_state_dict_pre_hook(set_lr, prepend=True)
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("post", o.param_groups[0]["lr"], len(o.state))))
    opt.load_state_dict(saved)
    assert calls == ["set_lr", "widen", ("post", 0.5, 2)]
    assert opt.param_groups[0]["eps"] == 0.5e-6
    assert saved["param_groups"][0]["lr"] == 1e-2  # the caller's dict is left alone


def test_a_pre_hook_can_make_a_checkpoint_fit_and_the_checks_see_its_result():
    params = make_params()
    source = selopt.AdamW(params)
    train(source, params, 1, seed=0)
    saved = copy.deepcopy(source.state_dict())  # state_dict() hands out the live state
    saved["state"][0]["exp_avg"] = saved["state"][0]["exp_avg"].t()  # a transposed layout
    opt = selopt.AdamW(clone_params(params))
    with pytest.raises(ValueError, match=r"\['exp_avg'\] has shape \(3, 5\), but its param has shape \(5, 3\)"):
        opt.load_state_dict(saved)
    assert not opt.state
    opt.register_load_state_dict_pre_hook(
        lambda o, sd: {**sd, "state": {**sd["state"], 0: {**sd["state"][0], "exp_avg": sd["state"][0]["exp_avg"].t()}}}
    )
    opt.load_state_dict(saved)
    assert torch.equal(opt.state[opt.param_groups[0]["params"][0]]["exp_avg"], source.state[params[0]]["exp_avg"])


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_printing_shows_every_group_and_its_options(optimizer_class):
    params = make_params()
    groups = [{"params": params[:1]}, {"params": params[1:], "fraction": 1.0, "weight_decay": 0.0}]
    opt = optimizer_class(groups, lr=0.1)
    text = repr(opt)
    assert text.startswith(f"{optimizer_class.__name__} (\nParameter Group 0\n")
    assert "Parameter Group 1\n" in text
    default_fraction = inspect.signature(optimizer_class).parameters["fraction"].default
    assert f"    fraction: {default_fraction}\n" in text and "    fraction: 1.0\n" in text
    assert "    lr: 0.1\n" in text and "    capturable: False\n" in text and "params" not in text
