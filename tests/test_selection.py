"""MoFO semantics of the reference and of the optimizer built on it (docs/design.md §1, steps 3-5; §2)."""

import math

import pytest
import torch

import selopt
from selopt import reference


def brute_force_mask(m, fraction, block_size):
    """Selection by sorting each block in Python: slow and obviously right.

    NaN ranks above every number (``torch.topk``'s order, the official code's);
    an entry whose ``|m|`` is 0 is never selected.
    """
    values = m.flatten().tolist()
    block = len(values) if block_size is None else block_size
    def rank(x):  # NaN above inf above every finite |m|
        return (1, 0.0) if math.isnan(x) else (0, abs(x))

    selected = []
    for start in range(0, len(values), block or 1):
        chunk = values[start : start + block]
        ranked = sorted((rank(x) for x in chunk), reverse=True)
        threshold = ranked[max(1, math.floor(fraction * len(chunk))) - 1]
        selected += [rank(x) > (0, 0.0) and rank(x) >= threshold for x in chunk]
    return torch.tensor(selected, dtype=torch.bool).view(m.shape)


@pytest.mark.parametrize("numel", [1, 7, 256, 1000, 1025])
@pytest.mark.parametrize("block_size", [None, 16, 256])
@pytest.mark.parametrize("fraction", [0.01, 0.15, 0.5, 0.999])
def test_selection_moves_k_per_block_without_ties(numel, block_size, fraction):
    m = torch.randn(numel, generator=torch.Generator().manual_seed(numel), dtype=torch.float64)
    mask = reference.selection_mask(m, fraction, block_size)
    block = numel if block_size is None else block_size
    for start in range(0, numel, block):
        n = min(block, numel - start)
        assert mask[start : start + n].sum().item() == reference.block_k(fraction, n)
    assert torch.equal(mask, brute_force_mask(m, fraction, block_size))


@pytest.mark.parametrize("block_size", [None, 4, 16])
@pytest.mark.parametrize("fraction", [0.01, 0.15, 0.5, 0.9])
def test_selection_with_nan_inf_zeros_and_ties_matches_brute_force(fraction, block_size):
    generator = torch.Generator().manual_seed(3)
    pool = torch.tensor([0.0, -0.0, float("nan"), -float("nan"), float("inf"), -float("inf"), 1e-45, 0.5, -0.5, 2.0])
    m = pool[torch.randint(len(pool), (67,), generator=generator)]
    assert torch.equal(reference.selection_mask(m, fraction, block_size), brute_force_mask(m, fraction, block_size))


@pytest.mark.parametrize(
    ("fraction", "n", "k"),
    [(0.15, 100, 15), (0.15, 3, 1), (0.3, 10, 3), (0.1, 9, 1), (1e-6, 1, 1), (0.5, 7, 3), (0.999, 1000, 999)],
)
def test_block_k_is_floor_with_at_least_one(fraction, n, k):
    assert reference.block_k(fraction, n) == k


def test_ties_at_the_threshold_are_all_selected():
    m = torch.tensor([5.0, -3.0, 3.0, 3.0, 1.0, -3.0, 0.5, 0.0])
    mask = reference.selection_mask(m, 0.25, None)  # k = 2: threshold is 3, met by four entries
    assert mask.tolist() == [True, True, True, True, False, True, False, False]


def test_non_finite_momentum_ranks_above_every_number():
    nan, inf = float("nan"), float("inf")
    m = torch.tensor([0.1, nan, -0.2, 5.0, -inf, 0.3, 0.4, 0.5])
    # k = 2: NaN and -inf outrank 5.0, as torch.topk ranks them in the official code.
    assert reference.selection_mask(m, 0.25, None).tolist() == [False, True, False, False, True] + [False] * 3
    assert reference.selection_mask(m, 0.125, None).tolist() == [False, True] + [False] * 6
    assert reference.selection_mask(torch.full((4,), nan), 0.25, None).all()


@pytest.mark.parametrize("block_size", [None, 4])
def test_zero_momentum_is_never_selected(block_size):
    m = torch.tensor([0.0, -0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0])
    # k = 4 (or 2 per block), but only one |m| is non-zero: it alone moves.
    assert reference.selection_mask(m, 0.5, block_size).tolist() == [False] * 3 + [True] + [False] * 4
    assert not reference.selection_mask(torch.zeros(8), 0.5, block_size).any()
    # fraction = 1 is dense AdamW: every entry, zeros included.
    assert reference.selection_mask(torch.zeros(8), 1.0, block_size).all()


def test_blocks_partition_the_flattened_tensor_and_the_last_block_is_shorter():
    m = torch.arange(1.0, 11.0).view(2, 5)  # flattened 1..10; blocks of 4: [1..4], [5..8], [9, 10]
    mask = reference.selection_mask(m, 0.5, 4).flatten().tolist()
    assert mask == [False, False, True, True, False, False, True, True, False, True]
    assert reference.selection_mask(m, 0.5, None).flatten().tolist() == [False] * 5 + [True] * 5


def test_empty_tensor_selects_nothing():
    assert reference.selection_mask(torch.empty(0, 3), 0.5, 8).shape == (0, 3)


def step_once(param, grad, **options):
    """One optimizer step from zero state; returns the optimizer."""
    param = torch.nn.Parameter(param.clone())
    opt = selopt.MoFO([param], **options)
    param.grad = grad.clone()
    opt.step()
    return param, opt


@pytest.mark.parametrize("block_size", [None, 8])
def test_optimizer_moves_exactly_the_selection_of_its_momentum(block_size):
    gen = torch.Generator().manual_seed(0)
    param, grad = torch.randn(6, 9, generator=gen, dtype=torch.float64), torch.randn(6, 9, generator=gen, dtype=torch.float64)
    moved_param, opt = step_once(param, grad, lr=1e-2, weight_decay=0.0, fraction=0.2, block_size=block_size)
    expected = reference.selection_mask(opt.state[moved_param]["exp_avg"], 0.2, block_size)
    assert torch.equal(moved_param.detach() != param, expected)


def test_moments_are_dense_every_step():
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(50, generator=gen, dtype=torch.float64) for _ in range(3)]
    param = torch.nn.Parameter(torch.zeros(50, dtype=torch.float64))
    opt = selopt.MoFO([param], lr=1e-3, betas=(0.9, 0.99), fraction=0.1)
    m = torch.zeros(50, dtype=torch.float64)
    for g in grads:
        param.grad = g
        opt.step()
        m = 0.9 * m + 0.1 * g
    torch.testing.assert_close(opt.state[param]["exp_avg"], m, rtol=1e-12, atol=0)


def test_decay_all_shrinks_every_entry_decay_selected_only_the_moved():
    gen = torch.Generator().manual_seed(2)
    param, grad = torch.randn(40, generator=gen, dtype=torch.float64), torch.randn(40, generator=gen, dtype=torch.float64)
    options = dict(lr=0.1, weight_decay=0.5, fraction=0.25)
    all_param, opt = step_once(param, grad, decay="all", **options)
    selected = reference.selection_mask(opt.state[all_param]["exp_avg"], 0.25)
    sel_param, _ = step_once(param, grad, decay="selected", **options)
    torch.testing.assert_close(all_param.detach()[~selected], param[~selected] * (1 - 0.1 * 0.5), rtol=1e-15, atol=0)
    assert torch.equal(sel_param.detach()[~selected], param[~selected])
    torch.testing.assert_close(sel_param.detach()[selected], all_param.detach()[selected], rtol=1e-15, atol=0)


@pytest.mark.parametrize("mask_shape", ["row", "full"])
def test_soft_mask_update_mode_scales_each_step(mask_shape):
    gen = torch.Generator().manual_seed(3)
    param, grad = torch.randn(4, 6, generator=gen, dtype=torch.float64), torch.randn(4, 6, generator=gen, dtype=torch.float64)
    row_scale = torch.tensor([1.0, 0.5, 0.0, 0.25])
    mask = row_scale if mask_shape == "row" else row_scale[:, None].expand(4, 6).contiguous()
    plain, _ = step_once(param, grad, lr=0.1, weight_decay=0.0, fraction=0.5)
    masked = torch.nn.Parameter(param.clone())
    opt = selopt.MoFO([masked], lr=0.1, weight_decay=0.0, fraction=0.5)
    opt.set_soft_mask(masked, mask)
    masked.grad = grad.clone()
    opt.step()
    torch.testing.assert_close(masked.detach() - param, (plain.detach() - param) * row_scale[:, None].double())
    assert torch.equal(masked.detach()[2], param[2])


def test_soft_mask_grad_mode_equals_scaling_the_gradient():
    gen = torch.Generator().manual_seed(4)
    param = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    grads = [torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(5)]
    scale = torch.tensor([0.2, 1.0, 0.7])
    masked, scaled = torch.nn.Parameter(param.clone()), torch.nn.Parameter(param.clone())
    opt_masked = selopt.MoFO([masked], lr=0.05, fraction=0.4, soft_mask_mode="grad")
    opt_masked.set_soft_mask(masked, scale)
    opt_scaled = selopt.MoFO([scaled], lr=0.05, fraction=0.4)
    for g in grads:
        masked.grad, scaled.grad = g.clone(), g * scale[:, None].double()
        opt_masked.step()
        opt_scaled.step()
    torch.testing.assert_close(masked, scaled, rtol=1e-14, atol=0)


def test_param_groups_can_mix_selective_and_dense():
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.LayerNorm(10)).double()
    before = [p.detach().clone() for p in model.parameters()]
    opt = selopt.MoFO(selopt.param_groups(model, weight_decay=0.0, fraction=0.1), lr=1e-2)
    model(torch.randn(4, 10, dtype=torch.float64)).pow(2).sum().backward()
    opt.step()
    moved = {name: (p.detach() != b).sum().item() for (name, p), b in zip(model.named_parameters(), before)}
    assert moved["0.weight"] == 10  # floor(0.1 * 100)
    assert moved["0.bias"] == 10 and moved["1.weight"] == 10 and moved["1.bias"] == 10  # dense
