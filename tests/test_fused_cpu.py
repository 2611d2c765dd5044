"""The fused CPU implementation (:mod:`selopt.fused`) against the torch reference.

Checked as the kernels are (tests/test_kernels.py): per tensor, the selection
equals the reference's selection of the stored ``m`` and every value is within
:func:`selopt.check.step_problems`' tolerances; and beyond that, what the
fused path promises exactly: unselected entries bit for bit, dense fp32 bit
for bit ``torch.optim.AdamW(fused=True)``. Needs no Triton.
"""

from __future__ import annotations

import pytest
import torch

import selopt
from selopt import fused, functional, reference, selection
from selopt.bucket import Bucket
from selopt.check import HYPER, step_problems
from selopt.options import AdamWOptions
from tests.grad_fills import mostly_zero, ties, with_nans

SHAPES = [(1,), (0,), (255,), (257,), (3, 333), (2, 2, 129), (1500,)]
DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
               (torch.float16, torch.float32), (torch.float16, torch.bfloat16), (torch.float32, torch.bfloat16)]


def make_tensors(shapes, dtype=torch.float32, moment_dtype=torch.float32, *, amsgrad=False, seed=0, grad_fill=None,
                 step=3.0):
    gen = torch.Generator().manual_seed(seed)
    columns = {name: [] for name in ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step", "selection")}
    for shape in shapes:
        columns["param"].append(torch.randn(shape, generator=gen).to(dtype))
        grad = torch.randn(shape, generator=gen) if grad_fill is None else grad_fill(shape, gen)
        columns["grad"].append(grad.to(dtype))
        columns["exp_avg"].append((0.1 * torch.randn(shape, generator=gen)).to(moment_dtype))
        columns["exp_avg_sq"].append((0.1 * torch.rand(shape, generator=gen)).to(moment_dtype))
        columns["max_exp_avg_sq"].append((0.12 * torch.rand(shape, generator=gen)).to(moment_dtype) if amsgrad
                                         else None)
        columns["step"].append(torch.tensor(step))
        columns["selection"].append(torch.randint(0, 2, shape, generator=gen).bool())  # unwritten shows
    return columns


def bucket_of(columns, soft_masks=None, seeds=None) -> Bucket:
    amsgrad = columns["max_exp_avg_sq"][0] is not None
    return Bucket(columns["param"], columns["grad"], columns["exp_avg"], columns["exp_avg_sq"], columns["step"],
                  columns["max_exp_avg_sq"] if amsgrad else None, soft_masks, seeds, columns["selection"])


def step_and_check(shapes, *, dtype=torch.float32, moment_dtype=torch.float32, amsgrad=False, soft_masks=None,
                   grad_scale=None, found_inf=None, seed=0, grad_fill=None, **keywords):
    columns = make_tensors(shapes, dtype, moment_dtype, amsgrad=amsgrad, seed=seed, grad_fill=grad_fill)
    before = {name: [None if t is None else t.clone() for t in column] for name, column in columns.items()}
    options = AdamWOptions(**{**HYPER, **keywords}, amsgrad=amsgrad)
    fused.prepare_adamw(bucket_of(columns, soft_masks), options, grad_scale=grad_scale, found_inf=found_inf)()
    for i, shape in enumerate(shapes):
        old = {name: column[i] for name, column in before.items()}
        new = {name: column[i] for name, column in columns.items()}
        mask = None if soft_masks is None else soft_masks[i]
        problems = step_problems(old, new, options=options, soft_mask=mask, grad_scale=grad_scale)
        assert not problems, f"tensor {i} {shape}: {problems}"
    return before, columns, options


@pytest.mark.parametrize("block_size", [None, 256, 1024])
@pytest.mark.parametrize("fraction", [0.03, 0.25, 0.5, 1.0])
def test_matches_reference_fp32(block_size, fraction):
    step_and_check(SHAPES, fraction=fraction, block_size=block_size, seed=int(fraction * 100))


@pytest.mark.parametrize(("dtype", "moment_dtype"), DTYPE_PAIRS[:3] + DTYPE_PAIRS[-1:])
@pytest.mark.parametrize("block_size", [None, 64, 512])
def test_tensors_longer_than_a_piece_match_reference(block_size, dtype, moment_dtype, monkeypatch):
    monkeypatch.setattr(fused, "PIECE", 256)  # the fused kernel, select and blend go piece by piece
    step_and_check([(3, 333), (1500,), (7,)], dtype=dtype, moment_dtype=moment_dtype, fraction=0.2,
                   block_size=block_size, seed=13, amsgrad=True, maximize=True)


@pytest.mark.parametrize(("dtype", "moment_dtype"), DTYPE_PAIRS)
@pytest.mark.parametrize(("fraction", "block_size"), [(0.2, None), (0.2, 512), (1.0, None)])
def test_low_precision_matches_reference(dtype, moment_dtype, fraction, block_size):
    step_and_check([(1,), (300,), (5, 1001)], dtype=dtype, moment_dtype=moment_dtype, fraction=fraction,
                   block_size=block_size, seed=7)


@pytest.mark.parametrize("block_size", [None, 256])
def test_options_amsgrad_maximize_decay_selected_small_beta1(block_size):
    step_and_check([(7, 65), (1000,)], amsgrad=True, betas=(0.3, 0.999), fraction=0.25, block_size=block_size,
                   maximize=True, decay="selected", seed=3)


@pytest.mark.parametrize("block_size", [None, 256])
@pytest.mark.parametrize("mode", ["update", "grad"])
@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_soft_masks(block_size, mode, per_row, dtype):
    shapes = [(6, 70), (300,), (4, 9)]
    gen = torch.Generator().manual_seed(1)
    masks = [torch.rand(s[:1] if per_row else s, generator=gen) for s in shapes]
    masks[1] = None  # tensors without a mask share the bucket
    step_and_check(shapes, dtype=dtype, soft_masks=masks, fraction=0.3, block_size=block_size,
                   soft_mask_mode=mode, seed=5, grad_scale=torch.tensor(2.0), maximize=True)


@pytest.mark.parametrize("mode", ["update", "grad"])
def test_soft_masks_with_every_entry_selected(mode):
    masks = [torch.rand(40, 3), None]
    step_and_check([(40, 3), (9,)], soft_masks=masks, fraction=1.0, soft_mask_mode=mode)


@pytest.mark.parametrize("grad_fill", [ties, with_nans, mostly_zero])
@pytest.mark.parametrize("block_size", [None, 256])
def test_ties_nans_and_zeros_select_as_the_reference(grad_fill, block_size):
    _, after, _ = step_and_check([(1000,), (3, 100), (5,)], grad_fill=grad_fill, fraction=0.3, block_size=block_size,
                                 seed=9)
    assert all(s[~m.isfinite()].all() for s, m in zip(after["selection"], after["exp_avg"]))


@pytest.mark.parametrize("piece", [fused.PIECE, 64, 50])  # small pieces: a tensor spans several
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("block_size", [None, 7, 64, 128])
def test_threshold_select_equals_the_reference_selection(dtype, block_size, piece, monkeypatch):
    monkeypatch.setattr(fused, "PIECE", piece)
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(20, 33, generator=gen, dtype=torch.float64).to(dtype)
    m[0, :10] = float("nan")
    m[1, :5] = float("-inf")
    m[2] = 0.0
    m[3, :20] = m[3, 0]  # ties at the threshold
    m.view(-1)[-40:] = -m.view(-1)[-40:]
    for fraction in (0.01, 0.1, 0.3, 0.9, 1.0):
        want = selection.selection_mask(m if dtype == torch.float64 else m.float(), fraction, block_size)
        assert torch.equal(torch.from_numpy(fused.keep_mask(m, fraction, block_size) == 0), want), fraction


def test_nan_payloads_tie_with_each_other():
    # Different NaN bit patterns are one key in the reference: numpy's select sees the payloads.
    m = torch.tensor([1.0, 2.0, 3.0, 4.0])
    m.view(torch.int32)[:3] = torch.tensor([0x7FC00000, 0x7F800001, -0x00400000], dtype=torch.int32)  # NaNs
    assert m[:3].isnan().all()
    assert torch.equal(torch.from_numpy(fused.keep_mask(m, 0.25, None) == 0),
                       selection.selection_mask(m, 0.25))


def test_unselected_entries_keep_the_reference_value_bit_for_bit():
    for decay in ("all", "selected"):
        before, after, options = step_and_check([(3000,)], fraction=0.1, block_size=512, decay=decay, seed=2)
        want = reference.adamw_math(before["param"][0], before["grad"][0], before["exp_avg"][0],
                                    before["exp_avg_sq"][0], None, step=4.0, options=options)
        unselected = ~after["selection"][0]
        assert torch.equal(after["param"][0][unselected], want.param[unselected])


def test_dense_fp32_is_torch_fused_adamw_bit_for_bit():
    torch.manual_seed(0)
    ours = [torch.randn(40, 30, requires_grad=True), torch.randn(77, requires_grad=True)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt_ours = selopt.AdamW(ours, lr=1e-2, weight_decay=0.1, amsgrad=True)
    opt_theirs = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, amsgrad=True, fused=True)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in ours]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"):
            assert torch.equal(opt_ours.state[p][key], opt_theirs.state[q][key]), key


def test_float64_matches_reference_closely():
    columns = make_tensors([(300,), (4, 50)], torch.float64, torch.float64, amsgrad=True, seed=4)
    want = make_tensors([(300,), (4, 50)], torch.float64, torch.float64, amsgrad=True, seed=4)
    options = AdamWOptions(**HYPER, fraction=0.3, block_size=64, amsgrad=True)
    fused.prepare_adamw(bucket_of(columns), options)()
    reference.prepare_adamw(bucket_of(want), options)()
    for name in ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step", "selection"):
        for got, expected in zip(columns[name], want[name]):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)


def test_found_inf_changes_nothing_and_grad_scale_unscales():
    columns = make_tensors([(700,), (3, 31)], amsgrad=True, seed=6)
    before = {name: [None if t is None else t.clone() for t in column] for name, column in columns.items()}
    fused.prepare_adamw(bucket_of(columns), AdamWOptions(**HYPER, fraction=0.4, amsgrad=True),
                        found_inf=torch.ones(()))()
    for name in columns:
        for old, new in zip(before[name], columns[name]):
            assert old is None or torch.equal(old, new), name
    step_and_check([(700,), (3, 31)], fraction=0.4, block_size=256, grad_scale=torch.tensor(1024.0),
                   found_inf=torch.zeros(()), lr=torch.tensor(HYPER["lr"]))


@pytest.mark.parametrize("fraction", [0.3, 1.0])
def test_grads_are_left_as_they_were(fraction):
    # torch's fused kernel writes the unscaled gradient back into the grad; the reference never touches it.
    columns = make_tensors([(300,), (2, 40)], seed=1)
    grads = [g.clone() for g in columns["grad"]]
    options = AdamWOptions(**HYPER, fraction=fraction, maximize=True)
    fused.prepare_adamw(bucket_of(columns), options, grad_scale=torch.tensor(8.0))()
    assert all(torch.equal(a, b) for a, b in zip(columns["grad"], grads))


def test_stochastic_rounding_matches_the_reference_draws():
    # The same seeds and step give the reference's noise: the params agree bit for bit where selected moments do.
    shapes = [(500,), (3, 70)]
    results = []
    for implementation in (fused, reference):
        columns = make_tensors(shapes, torch.bfloat16, torch.float32, seed=12)
        seeds = [torch.tensor(1234 + i) for i in range(len(shapes))]
        options = AdamWOptions(**HYPER, fraction=0.3, stochastic_rounding=True)
        implementation.prepare_adamw(bucket_of(columns, seeds=seeds), options)()
        results.append(columns)
    for ours, theirs in zip(results[0]["param"], results[1]["param"]):
        assert (ours.float() - theirs.float()).abs().max() <= 2**-7 * theirs.float().abs().max()
        assert (ours != theirs).float().mean() < 0.05  # a draw differs only where the fp32 values differ


def test_several_steps_track_the_reference():
    shapes = [(600,), (2, 50)]
    ours, theirs = make_tensors(shapes, seed=8, step=0.0), make_tensors(shapes, seed=8, step=0.0)
    options = AdamWOptions(**HYPER, fraction=0.2, block_size=128)
    for _ in range(5):
        fused.prepare_adamw(bucket_of(ours), options)()
        reference.prepare_adamw(bucket_of(theirs), options)()
    for name in ("param", "exp_avg", "exp_avg_sq"):
        for a, b in zip(ours[name], theirs[name]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert [float(s) for s in ours["step"]] == [5.0, 5.0]


def test_non_contiguous_params_and_state():
    base = torch.randn(30, 40)
    p = base.t()  # a transposed view: neither row- nor column-contiguous in flat order
    columns = dict(param=[p], grad=[torch.randn(40, 30).t().contiguous().t()], exp_avg=[0.1 * torch.randn(30, 40).t()],
                   exp_avg_sq=[torch.rand(30, 40).t()], max_exp_avg_sq=[None], step=[torch.tensor(2.0)],
                   selection=[torch.zeros(30, 40, dtype=torch.bool).t()])  # written through a copy
    before = {name: [None if t is None else t.clone() for t in column] for name, column in columns.items()}
    options = AdamWOptions(**HYPER, fraction=0.25, block_size=64)
    fused.prepare_adamw(bucket_of(columns), options)()
    old = {name: column[0] for name, column in before.items()}
    new = {name: column[0] for name, column in columns.items()}
    assert not step_problems(old, new, options=options)


def test_backend_auto_runs_it_on_cpu_and_torch_runs_the_reference():
    options = AdamWOptions(fraction=0.1)
    cpu = torch.device("cpu")
    assert functional.choose_implementation(cpu, torch.float32, torch.float32, sharded=False,
                                            options=options) is functional.FUSED
    assert functional.choose_implementation(cpu, torch.float32, torch.float32, sharded=False,
                                            options=AdamWOptions(backend="torch")) is functional.REFERENCE
    assert functional.choose_implementation(cpu, torch.float32, torch.float32, sharded=True,
                                            options=options) is functional.SHARDED


@pytest.mark.parametrize("block_size", [None, 64])
def test_optimizer_checkpoints_move_between_fused_and_reference(block_size):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 5))
    twin = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 5))
    twin.load_state_dict(model.state_dict())
    ours = selopt.MoFO(model.parameters(), lr=1e-2, fraction=0.2, block_size=block_size)
    theirs = selopt.MoFO(twin.parameters(), lr=1e-2, fraction=0.2, block_size=block_size, backend="torch")
    x = torch.randn(16, 20)
    for step in range(4):
        for net, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
        if step == 1:  # swap the states mid-run: the layouts are the same
            state = ours.state_dict()
            ours.load_state_dict(theirs.state_dict())
            theirs.load_state_dict(state)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_thread_count_changes_nothing():
    results = []
    for threads in (1, 3):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            columns = make_tensors(SHAPES, seed=3)
            fused.prepare_adamw(bucket_of(columns), AdamWOptions(**HYPER, fraction=0.2, block_size=256))()
        finally:
            torch.set_num_threads(previous)
        results.append(columns)
    for name in ("param", "exp_avg", "exp_avg_sq", "selection"):
        for a, b in zip(results[0][name], results[1][name]):
            assert torch.equal(a, b), name
