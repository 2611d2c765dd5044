"""No silent failure (issue 20): non-finite moments show, zero moments stay put, a step is whole or nothing.

Each test runs every backend this machine can run: the torch reference, and
the Triton kernels (on CUDA, or on CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import copy
import gc
import os
import types
import weakref

import pytest
import torch

import selopt
from selopt import functional, reference
from selopt.options import AdamWOptions

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
KERNELS = (INTERPRET or torch.cuda.is_available()) and functional.triton_problem() is None
BACKENDS = ["torch"] + (["triton"] if KERNELS else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(not KERNELS, reason="needs Triton and CUDA, or TRITON_INTERPRET=1")


def _param(values) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.as_tensor(values, dtype=torch.float32, device=DEVICE).clone())


# ---------------------------------------------------------------- 1. non-finite moments move


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [None, 16])
def test_a_nan_gradient_reaches_the_parameter_and_is_counted(backend, block_size):
    torch.manual_seed(0)
    param = _param(torch.randn(8, 8))
    opt = selopt.MoFO([param], lr=1e-2, fraction=0.1, block_size=block_size, backend=backend)
    opt.track_updates()
    grad = torch.randn(8, 8, device=DEVICE)
    grad[3, 5] = float("nan")
    param.grad = grad
    opt.step()
    # As torch.optim.AdamW: the bad entry turns NaN at once instead of freezing silently.
    assert param[3, 5].isnan() and param.isnan().sum() == 1
    group = opt.update_stats().groups[0]
    assert group.nonfinite == 1 and "1 entries with NaN/inf moments" in str(group)
    # Later finite gradients cannot hide it: the moments stay NaN, and NaN always ranks first.
    for _ in range(3):
        param.grad = torch.randn(8, 8, device=DEVICE)
        opt.step()
        assert opt.update_stats().groups[0].nonfinite == 1 and param[3, 5].isnan()


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_all_nan_gradient_turns_the_whole_tensor_nan(backend):
    param = _param(torch.ones(5, 7))
    opt = selopt.MoFO([param], fraction=0.15, backend=backend)
    opt.track_updates(per_tensor=True)
    param.grad = torch.full((5, 7), float("nan"), device=DEVICE)
    opt.step()
    assert param.isnan().all()
    assert opt.update_stats().groups[0].tensors[0].nonfinite == 35


# ---------------------------------------------------------------- 2. zero moments never move


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [None, 64])
def test_unused_embedding_rows_keep_their_values_under_decay_selected(backend, block_size):
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(64, 16).to(DEVICE)  # small for the interpreter
    before = embedding.weight.detach().clone()
    opt = selopt.MoFO(embedding.parameters(), lr=1e-2, fraction=0.15, weight_decay=0.1, decay="selected",
                      block_size=block_size, backend=backend)
    opt.track_updates()
    for step in range(3):
        ids = torch.randint(0, 10, (4, 8), device=DEVICE)  # only rows 0-9 ever see a gradient
        embedding(ids).square().mean().backward()
        opt.step()
        opt.zero_grad()
        counts = opt.update_stats().groups[0]
        assert counts.moved <= 10 * 16 and counts.decayed == counts.moved
    assert torch.equal(embedding.weight[10:], before[10:])
    assert not torch.equal(embedding.weight[:10], before[:10])


# ---------------------------------------------------------------- 3. whole steps or none


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(), (1,)], ids=["0-d", "(1,) as ShardedGradScaler"])
def test_found_inf_and_grad_scale_of_one_element_step_or_skip(backend, shape):
    params = [_param(torch.ones(3)), _param(torch.tensor(2.0))]  # a 0-d param too
    opt = selopt.AdamW(params, lr=0.1, backend=backend)
    for found, moves in ((1.0, False), (0.0, True)):
        for p in params:
            p.grad = torch.ones_like(p) * 4
        opt.grad_scale = torch.full(shape, 4.0, device=DEVICE)
        opt.found_inf = torch.full(shape, found, device=DEVICE)
        before = [p.detach().clone() for p in params]
        opt.step()
        assert all(torch.equal(p, b) != moves for p, b in zip(params, before))
        assert all(opt.state[p]["step"].item() == float(moves) for p in params)


@needs_kernels
def test_a_duplicate_param_with_tracking_steps_once_on_the_kernels():
    param = _param(torch.randn(40))
    twin = _param(param.detach())
    param.grad, twin.grad = torch.randn(40, device=DEVICE), None
    twin.grad = param.grad.clone()
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = selopt.MoFO([param, param], fraction=0.25, backend="triton")
    opt.track_updates()
    opt.step()
    selopt.MoFO([twin], fraction=0.25, backend="triton").step()
    assert torch.equal(param, twin)  # stepped once, as a single listing would
    assert opt.update_stats().groups[0].entries == 40


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def _unchanged(opt, params, snapshot) -> bool:
    values, state_dict = snapshot
    now = opt.state_dict()
    same_state = now["state"].keys() == state_dict["state"].keys() and all(
        torch.equal(now["state"][i][k], v) if isinstance(v, torch.Tensor) else now["state"][i][k] == v
        for i, entry in state_dict["state"].items() for k, v in entry.items())
    return same_state and all(torch.equal(p, v) for p, v in zip(params, values))


def _sparse_grad_in_the_last_group(params, opt, monkeypatch):
    params[-1].grad = params[-1].grad.to_sparse()


def _found_inf_of_two_elements(params, opt, monkeypatch):
    opt.found_inf = torch.zeros(2, device=DEVICE)


def _grad_scale_not_a_tensor(params, opt, monkeypatch):
    opt.grad_scale = 2.0


def _kernels_without_interpreter(params, opt, monkeypatch):
    if DEVICE != "cpu":
        pytest.skip("the kernels refuse CPU tensors only without the interpreter")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    opt.param_groups[-1]["backend"] = "triton"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fault", [_sparse_grad_in_the_last_group, _found_inf_of_two_elements,
                                   _grad_scale_not_a_tensor, _kernels_without_interpreter])
@pytest.mark.parametrize("stepped_before", [False, True], ids=["fresh", "stepped"])
def test_a_step_that_raises_changes_nothing(backend, fault, stepped_before, monkeypatch):
    if fault is _kernels_without_interpreter and not KERNELS:
        pytest.skip("needs Triton")
    torch.manual_seed(0)
    params = [_param(torch.randn(6, 5)), _param(torch.randn(5)), _param(torch.randn(4, 4))]
    opt = selopt.MoFO([{"params": params[:2]}, {"params": params[2:]}], fraction=0.3, backend=backend)
    if stepped_before:
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    for p in params:
        p.grad = torch.randn_like(p)
    snapshot = _snapshot(opt, params)
    fault(params, opt, monkeypatch)
    with pytest.raises((ValueError, TypeError, RuntimeError)):
        opt.step()
    assert _unchanged(opt, params, snapshot)


# ---------------------------------------------------------------- 4. bf16 moments: one rule


def _bf16_moment_bucket(seed: int):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(33, 17), (300,)]
    params = [torch.randn(s, generator=gen).to(DEVICE) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(DEVICE) for s in shapes]
    exp_avgs = [(0.1 * torch.randn(s, generator=gen)).to(DEVICE, torch.bfloat16) for s in shapes]
    exp_avg_sqs = [(0.1 * torch.rand(s, generator=gen)).to(DEVICE, torch.bfloat16) for s in shapes]
    steps = [torch.tensor(4.0) for _ in shapes]
    return params, grads, exp_avgs, exp_avg_sqs, None, steps


@pytest.mark.parametrize("fraction", [1.0, 0.3])
def test_fp32_params_with_bf16_moments_step_alike_on_every_path(fraction):
    options = AdamWOptions(lr=1e-2, fraction=fraction, moment_dtype=torch.bfloat16)
    implementations = [functional.REFERENCE, functional.SHARDED] + ([functional.TRITON] if KERNELS else [])
    results = []
    for implementation in implementations:
        bucket = _bf16_moment_bucket(0)
        if implementation.counts_on_device:
            bucket[5][:] = [s.to(DEVICE) for s in bucket[5]]
        functional.adamw(*bucket, options=options, implementation=implementation)
        results.append(bucket)
    # The update reads the moments as stored (bf16): the reference and its sharded form agree bit for
    # bit, and the kernels within a few fp32 ulps of the parameter (their fast sqrt and division).
    reference_params = results[0][0]
    for p, q in zip(reference_params, results[1][0]):
        assert torch.equal(p, q)
    for bucket in results[2:]:
        for p, q in zip(reference_params, bucket[0]):
            torch.testing.assert_close(q, p, rtol=4e-7, atol=1e-7)
    # The update read the stored moments: recomputing it from them gives the reference's parameter.
    params, grads, exp_avgs, exp_avg_sqs, _, _ = _bf16_moment_bucket(0)
    for p, g, m, v, new in zip(params, grads, exp_avgs, exp_avg_sqs, reference_params):
        moments = reference.adam_moments(p, g, m, v, None, options=options)
        assert moments.exp_avg.equal(moments.exp_avg.bfloat16().float())


# ---------------------------------------------------------------- 6. a failing compile leaks nothing


@needs_kernels
def test_a_remembered_compile_failure_raises_fresh_errors_and_keeps_no_step_alive(monkeypatch):
    from selopt.kernels import launch, tables

    memo = launch.CompileMemo()
    monkeypatch.setattr(launch, "_memo", memo)
    # The interpreter compiles nothing: stand in for a GPU whose compiler refuses every kernel,
    # so that every launch goes through the real memo.
    monkeypatch.setattr(launch, "INTERPRETED", False)
    target = types.SimpleNamespace(get_current_target=lambda: "sm_90 (simulated)")
    monkeypatch.setattr(launch.triton.runtime, "driver", types.SimpleNamespace(active=target))
    compiles = []

    def refuse(self, target=None):
        compiles.append(self.name)
        raise launch.KernelCompileError(self.name, self.constexprs, target, NameError("X is not defined"))
    monkeypatch.setattr(launch.Launch, "compile", refuse)
    monkeypatch.setattr(functional, "AUTO_KERNEL_DEVICES", ("cuda", "cpu"))
    plans = []
    real_plan_for = tables.plan_for
    monkeypatch.setattr(tables, "plan_for", lambda *a, **k: plans.append(1) or real_plan_for(*a, **k))

    param = _param(torch.randn(64))
    opt = selopt.MoFO([param], fraction=0.25, backend="auto")
    grads, errors = [], []
    with pytest.warns(RuntimeWarning, match="selopt runs its torch reference"):
        for _ in range(20):
            param.grad = torch.randn(64, device=DEVICE)
            grads.append(weakref.ref(param.grad))
            opt.step()
    param.grad = None
    gc.collect()
    assert len(compiles) == 1 and len(plans) == 1  # compiled once, planned once: later steps fall back at once
    assert all(g() is None for g in grads)  # no step's gradient is kept alive by a traceback

    # With backend="triton" the memo raises: a new error each time, with its own short traceback.
    opt.param_groups[0]["backend"] = "triton"
    for _ in range(3):
        param.grad = torch.randn(64, device=DEVICE)
        with pytest.raises(launch.KernelCompileError, match="X is not defined") as caught:
            opt.step()
        errors.append(caught.value)
    assert len({id(e) for e in errors}) == 3
    assert len({len(list(_frames(e.__traceback__))) for e in errors}) == 1


def _frames(traceback):
    while traceback is not None:
        yield traceback.tb_frame
        traceback = traceback.tb_next


# ---------------------------------------------------------------- 5, 7. what the reference keeps, stats by name


@pytest.mark.parametrize("backend", BACKENDS)
def test_amsgrad_keeps_a_nan_max_as_the_reference_and_torch_do(backend):
    param = _param(torch.ones(6))
    opt = selopt.AdamW([param], amsgrad=True, backend=backend)
    param.grad = torch.ones(6, device=DEVICE)
    opt.step()
    opt.state[param]["max_exp_avg_sq"][2] = float("nan")
    opt.state[param]["max_exp_avg_sq"][4] = float("inf")
    param.grad = torch.ones(6, device=DEVICE)
    opt.step()
    kept = opt.state[param]["max_exp_avg_sq"]
    assert kept[2].isnan() and kept[4].isinf() and kept[[0, 1, 3, 5]].isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_tensor_stats_are_keyed_by_name_for_named_parameters(backend):
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 2)).to(DEVICE)
    opt = selopt.MoFO(model.named_parameters(), fraction=0.5, backend=backend)
    opt.track_updates(per_tensor=True)
    model(torch.randn(3, 6, device=DEVICE)).sum().backward()
    opt.step()
    tensors = opt.update_stats().groups[0].tensors
    assert sorted(tensors) == sorted(name for name, _ in model.named_parameters())
    assert tensors["0.weight"].entries == 24
