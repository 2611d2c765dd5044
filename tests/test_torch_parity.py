"""At fraction=1 selopt is AdamW: it must track torch.optim.AdamW(foreach=False) step for step."""

import itertools

import pytest
import torch

import selopt

SHAPES = [(7, 5), (13,), (1,), (3, 4, 2)]
# fp64: 1e-10 relative; fp32: a few ulps (in practice the op order is torch's, so equal bits).
TOLERANCES = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=4e-7, atol=1e-7)}
OPTION_COMBOS = [
    dict(amsgrad=amsgrad, maximize=maximize, weight_decay=weight_decay)
    for amsgrad, maximize, weight_decay in itertools.product((False, True), (False, True), (0.0, 0.1))
]


def make_params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=dtype) for shape in SHAPES]


def run_pair(dtype, steps, torch_kwargs, selopt_kwargs, scheduler=None, grad_transform=None):
    """Run torch AdamW and selopt on identical params and gradients; return both param lists."""
    initial = make_params(dtype)
    ours = [p.clone().requires_grad_() for p in initial]
    theirs = [p.clone().requires_grad_() for p in initial]
    opt_theirs = torch.optim.AdamW(theirs, foreach=False, **torch_kwargs)
    opt_ours = selopt.AdamW(ours, **selopt_kwargs)
    schedulers = [scheduler(o) for o in (opt_theirs, opt_ours)] if scheduler else []
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=gen, dtype=dtype) for p in initial]
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        for p, g in zip(ours, grads):
            p.grad = g.clone() if grad_transform is None else grad_transform(g)
        opt_theirs.step()
        opt_ours.step()
        for s in schedulers:
            s.step()
    return ours, theirs, opt_ours, opt_theirs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("options", OPTION_COMBOS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_fraction_one_matches_torch_adamw(dtype, options):
    kwargs = dict(lr=3e-2, betas=(0.8, 0.99), eps=1e-7, **options)
    ours, theirs, opt_ours, opt_theirs = run_pair(dtype, 25, kwargs, dict(kwargs, fraction=1.0, backend="torch"))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOLERANCES[dtype])
    for p_ours, p_theirs in zip(ours, theirs):
        for key in opt_theirs.state[p_theirs]:
            torch.testing.assert_close(opt_ours.state[p_ours][key], opt_theirs.state[p_theirs][key], **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(
    "extra",
    [dict(decay="selected"), dict(block_size=4), dict(soft_mask_mode="grad")],
    ids=["decay-selected", "block-4", "grad-mode"],
)
def test_options_that_must_not_matter_at_fraction_one(dtype, extra):
    kwargs = dict(lr=1e-2, weight_decay=0.05)
    ours, theirs, *_ = run_pair(dtype, 20, kwargs, dict(kwargs, **extra))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOLERANCES[dtype])


def test_lr_scheduler_drives_selopt_like_torch():
    kwargs = dict(lr=5e-2, weight_decay=0.01)
    scheduler = lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    ours, theirs, opt_ours, _ = run_pair(torch.float64, 20, kwargs, kwargs, scheduler=scheduler)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float64])
    assert opt_ours.param_groups[0]["initial_lr"] == 5e-2


def test_grad_scale_divides_gradients_like_unscaling():
    scale = torch.tensor(1024.0)
    kwargs = dict(lr=1e-2, weight_decay=0.01)

    class Scaled(selopt.AdamW):
        grad_scale = scale

    initial = make_params(torch.float64)
    ours = [p.clone().requires_grad_() for p in initial]
    theirs = [p.clone().requires_grad_() for p in initial]
    opt_ours, opt_theirs = Scaled(ours, **kwargs), torch.optim.AdamW(theirs, foreach=False, **kwargs)
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape, generator=gen, dtype=torch.float64)
            a.grad, b.grad = g * scale, g
        opt_ours.step()
        opt_theirs.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float64])


def test_closure_is_called_and_its_loss_returned():
    w = torch.nn.Parameter(torch.tensor([2.0, -1.0], dtype=torch.float64))
    opt = selopt.MoFO([w], lr=0.1, weight_decay=0.0, fraction=0.5)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == [1] and loss.item() == pytest.approx(5.0)
    assert w[0].item() == pytest.approx(1.9) and w[1].item() == -1.0  # only |m| = 0.4 moved
