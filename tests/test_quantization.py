"""8-bit moments (``moment_dtype="8bit"``): the format, the reference step on it, options, state and checkpoints.

The kernels' side is tests/test_kernels_8bit.py; 1 against 2 ranks and DCP
resume are tests/test_distributed.py's ``dtensor_8bit`` and ``dcp_resume_8bit``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import selopt
from selopt import quantization, reference, selection
from selopt.options import AdamWOptions
from selopt.state import fp32_moments

# ---------------------------------------------------------------- the format


@pytest.mark.parametrize("signed", [True, False])
def test_code_maps_are_the_dynamic_tree_maps(signed):
    values = quantization.dynamic_code_map(signed)
    assert values.dtype == torch.float32 and len(values) == 256 and len(values.unique()) == 256
    assert torch.equal(values, values.sort().values) and values[-1] == 1.0
    positive = values[values > 0]
    # Seven decades 1e-6 .. 1; the fraction doubles its resolution per decade (mirrored when signed).
    per_decade = [int(((positive >= 10.0**e) & (positive < 10.0 ** (e + 1))).sum()) for e in range(-7, 0)]
    assert per_decade == [2 ** (i + (0 if signed else 1)) for i in range(7)]
    if signed:
        assert torch.equal(values[values < 0].abs().sort().values, positive[:-1])  # every value but 1 mirrored
    else:
        assert values[0] == 0 and (values >= 0).all()


@pytest.mark.parametrize(("shape", "block"), [
    ((4096, 11008), 256), ((32000, 4096), 256), ((352, 128), 128), ((128, 352), 32), ((64, 64), 64),
    ((4, 8, 128), 256), ((4096,), None), ((63, 64), None), ((64, 65), None), ((1, 4096), 256), ((4096, 1), None),
])
def test_quant_block_from_the_whole_shape(shape, block):
    assert quantization.quant_block(shape) == block


def _nearest_codes(normalized: torch.Tensor, signed: bool) -> torch.Tensor:
    return (normalized.reshape(-1, 1) - quantization.code_map(signed)).abs().argmin(dim=1).view(normalized.shape)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(8, 256), (5, 96), (3, 2, 64)])
def test_quantize_takes_the_nearest_code_per_block(signed, shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen) * torch.logspace(-8, 0, shape[-1])
    x = x if signed else x.square()
    block = 32
    codes, scales = quantization.quantize(x, block, signed)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert scales.shape == quantization.scales_shape(shape, block) == (shape[0], x[0].numel() // block)
    blocks = x.reshape(-1, block)
    assert torch.equal(scales.view(-1), blocks.abs().amax(dim=1))
    normalized = blocks / scales.view(-1, 1)
    nearest = _nearest_codes(normalized, signed)
    if not signed:  # a positive value never takes the zero code
        nearest = torch.where(normalized > 0, nearest.clamp(min=1), nearest)
    # The midpoints are rounded to fp32: a value within an ulp of one may take either neighbour.
    differ = codes.view(-1, block).long() != nearest
    values = quantization.code_map(signed)
    assert torch.allclose((values[codes.view(-1, block).long()] - normalized).abs()[differ],
                          (values[nearest] - normalized).abs()[differ], atol=1e-7)
    # Round trip: within half the widest gap (1/128 of the block's absmax for the signed map).
    error = (quantization.dequantize(codes, scales, signed) - x).abs().reshape(-1, block)
    assert (error <= scales.view(-1, 1) * 0.0071).all()


def test_quantize_edge_blocks():
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1e-12, 0.0, 0.5], [float("nan"), 1.0, 2.0, 3.0]])
    codes, scales = quantization.quantize(x, 4, signed=False)
    assert scales.view(-1)[:2].tolist() == [0.0, 1.0] and scales.view(-1)[2].isnan()
    out = quantization.dequantize(codes, scales, signed=False)
    assert out[0].tolist() == [0.0] * 4
    assert out[1, 1] > 0 and out[1, 2] == 0  # the tiny positive v keeps a positive code; 0 stays 0
    assert out[2].isnan().all()  # one NaN makes its whole block NaN: loud, as a NaN moment is


def test_blocks_never_cross_rows():
    x = torch.randn(6, 96)
    codes, scales = quantization.quantize(x, quantization.quant_block(x.shape) or 32, signed=True)
    y = x.clone()
    y[3] *= 1000
    codes_y, scales_y = quantization.quantize(y, 32, signed=True)
    rows = [0, 1, 2, 4, 5]
    assert torch.equal(codes[rows], codes_y[rows]) and torch.equal(scales[rows], scales_y[rows])


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(("options", "named"), [
    ({"amsgrad": True}, "amsgrad"), ({"fraction": 0.1, "block_size": 128}, "block_size"),
    ({"moment_dtype": "8-bit"}, "moment_dtype"),
])
def test_bad_8bit_options_name_the_argument(options, named):
    with pytest.raises(ValueError, match=named):
        AdamWOptions(**{"moment_dtype": "8bit", **options})


def test_complex_params_refuse_8bit_before_any_state():
    p = torch.nn.Parameter(torch.zeros(64, 64, dtype=torch.complex64))
    with pytest.raises(ValueError, match="moment_dtype='8bit'"):
        selopt.AdamW([p], moment_dtype="8bit")


def test_8bit_state_layout_and_the_size_threshold():
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in [(64, 128), (128, 96), (4096,), (32, 64), (64, 65)]]
    opt = selopt.MoFO(params, lr=1e-3, moment_dtype="8bit")
    for p in params:
        p.grad = torch.randn_like(p)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    # Only the matrix whose 65-entry rows give no block is worth a warning; small and 1-D tensors are by design.
    assert [str(w.message) for w in caught if "fp32 moments" in str(w.message)] == [
        "a param of shape (64, 65) keeps fp32 moments under moment_dtype='8bit': its rows of 65 entries have no "
        "power-of-two factor of 32 or more to cut 8-bit blocks from"]
    layouts = [{key: (value.dtype, tuple(value.shape)) for key, value in opt.state[p].items() if key != "step"}
               for p in params]
    assert layouts[0] == {"exp_avg": (torch.uint8, (64, 128)), "exp_avg_sq": (torch.uint8, (64, 128)),
                          "exp_avg_scale": (torch.float32, (64, 1)), "exp_avg_sq_scale": (torch.float32, (64, 1))}
    assert layouts[1]["exp_avg_scale"] == (torch.float32, (128, 3))  # rows of 96: blocks of 32
    for layout, shape in zip(layouts[2:], [(4096,), (32, 64), (64, 65)]):
        assert layout == {"exp_avg": (torch.float32, shape), "exp_avg_sq": (torch.float32, shape)}


# ---------------------------------------------------------------- the step


def _step_by_hand(p, g, state, options, step):
    """The 8-bit step spelled out: dequantize, AdamW's moments, quantize, select and update from what is stored."""
    m_old = quantization.dequantize(state["exp_avg"], state["exp_avg_scale"], True)
    v_old = quantization.dequantize(state["exp_avg_sq"], state["exp_avg_sq_scale"], False)
    m = m_old.lerp(g, 1 - options.beta1)
    v = v_old.mul(options.beta2).addcmul(g, g, value=1 - options.beta2)
    block = quantization.quant_block(p.shape)
    m_stored = quantization.dequantize(*quantization.quantize(m, block, True), True)
    v_stored = quantization.dequantize(*quantization.quantize(v, block, False), False)
    selected = selection.selection_mask(m_stored, options.fraction, options.block_size)
    moments = reference.Moments(m_stored, v_stored, None)
    return reference.apply_update(p, moments, selected, step=step, options=options), selected


@pytest.mark.parametrize("options", [{"fraction": 1.0}, {"fraction": 0.2}, {"fraction": 0.2, "block_size": 256},
                                     {"fraction": 0.3, "decay": "selected", "maximize": True}])
def test_reference_step_reads_the_moments_as_stored(options):
    gen = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(48, 128, generator=gen))
    opt = selopt.AdamW([p], lr=1e-2, weight_decay=0.1, moment_dtype="8bit", backend="torch", **options)
    checked = AdamWOptions(lr=1e-2, weight_decay=0.1, moment_dtype="8bit", **options)
    for step in range(1, 5):
        p.grad = torch.randn(p.shape, generator=gen) * (10.0 ** -step)
        state = copy.deepcopy(opt.state[p]) or {
            "exp_avg": torch.zeros(p.shape, dtype=torch.uint8), "exp_avg_sq": torch.zeros(p.shape, dtype=torch.uint8),
            "exp_avg_scale": torch.zeros(48, 1), "exp_avg_sq_scale": torch.zeros(48, 1)}
        expected, selected = _step_by_hand(p.detach(), p.grad if not checked.maximize else -p.grad, state, checked, step)
        opt.step()
        assert torch.equal(p.detach(), expected)
        # The selection is the top-k of |m| as the state now holds it.
        stored = quantization.dequantize(opt.state[p]["exp_avg"], opt.state[p]["exp_avg_scale"], True)
        assert torch.equal(selected, selection.selection_mask(stored, checked.fraction, checked.block_size))


def test_adamw_8bit_follows_fp32_adamw():
    # fraction=1: the 8-bit optimizer stays close to torch.optim.AdamW (the quantization error of the
    # moments, not of the params, which stay fp32).
    gen = torch.Generator().manual_seed(2)
    init = torch.randn(64, 256, generator=gen)
    ours, theirs = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    opt_ours = selopt.AdamW([ours], lr=1e-2, moment_dtype="8bit")
    opt_theirs = torch.optim.AdamW([theirs], lr=1e-2)
    for _ in range(20):
        grad = torch.randn(init.shape, generator=gen) + init * 0.5
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt_ours.step()
        opt_theirs.step()
    moved = (theirs - init).norm()
    assert (ours - theirs).norm() < 0.05 * moved, ((ours - theirs).norm(), moved)


def test_found_inf_changes_nothing_and_nan_is_loud():
    p = torch.nn.Parameter(torch.randn(32, 128))
    opt = selopt.MoFO([p], lr=1e-2, fraction=0.3, moment_dtype="8bit")
    p.grad = torch.randn_like(p)
    opt.step()
    before, state_before = p.detach().clone(), copy.deepcopy(opt.state[p])
    opt.found_inf, opt.grad_scale = torch.ones(1), torch.ones(())
    opt.step()
    assert torch.equal(p.detach(), before)
    assert all(torch.equal(opt.state[p][k], v) for k, v in state_before.items())
    del opt.found_inf, opt.grad_scale
    p.grad = torch.randn_like(p)
    p.grad[5, 7] = float("nan")
    opt.step()
    # The NaN's block (row 5: one block of 128) reads NaN, and moves: the loss will show it, and so
    # does the update tracker's count of entries with non-finite moments.
    assert opt.state[p]["exp_avg_scale"][5].isnan().all() and p.detach()[5].isnan().all()
    assert not p.detach()[torch.arange(32) != 5].isnan().any()
    opt.track_updates()
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.update_stats().groups[0].nonfinite == 128


# ---------------------------------------------------------------- state_dict


def _trained(moment_dtype, steps=3, seed=3):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 64))
    opt = selopt.MoFO(model.parameters(), lr=1e-2, fraction=0.25, moment_dtype=moment_dtype)
    _train(model, opt, steps, seed)
    return model, opt


def _train(model, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model(torch.randn(8, 64, generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def test_state_dict_round_trips_and_resumes_exactly():
    model, opt = _trained("8bit")
    saved = copy.deepcopy(opt.state_dict())
    for entry in saved["state"].values():
        assert all(isinstance(v, torch.Tensor) for v in entry.values())  # ordinary tensors: torch.save, DCP
    resumed_model = copy.deepcopy(model)
    resumed = selopt.MoFO(resumed_model.parameters(), lr=1e-2, fraction=0.25, moment_dtype="8bit")
    resumed.load_state_dict(saved)
    _train(model, opt, 2, seed=9)
    _train(resumed_model, resumed, 2, seed=9)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
        assert all(torch.equal(opt.state[p][k], resumed.state[q][k]) for k in opt.state[p])


def test_fp32_checkpoint_loads_quantized():
    model, torch_opt = _trained(None)
    torch_style = torch.optim.AdamW(model.parameters())
    torch_style.load_state_dict(torch_opt.state_dict())  # a torch.optim.AdamW state dict, fp32 moments
    saved = torch_style.state_dict()
    ours = selopt.MoFO(model.parameters(), lr=1e-2, fraction=0.25, moment_dtype="8bit")
    ours.load_state_dict({**saved, "param_groups": ours.state_dict()["param_groups"]})
    weight = model[0].weight
    codes, scales = quantization.quantize(saved["state"][0]["exp_avg"], 64, signed=True)
    assert torch.equal(ours.state[weight]["exp_avg"], codes) and torch.equal(ours.state[weight]["exp_avg_scale"], scales)
    assert ours.state[model[0].bias]["exp_avg"].dtype == torch.float32  # 1-D: fp32 moments


def test_fp32_moments_for_torch_adamw_and_8bit_into_fp32_groups():
    model, opt = _trained("8bit")
    saved = opt.state_dict()
    converted = fp32_moments(saved)
    weight = model[0].weight
    expected = quantization.dequantize(opt.state[weight]["exp_avg_sq"], opt.state[weight]["exp_avg_sq_scale"], False)
    assert torch.equal(converted["state"][0]["exp_avg_sq"], expected)
    assert "exp_avg_scale" not in converted["state"][0] and saved["state"][0]["exp_avg"].dtype == torch.uint8
    torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch_opt.load_state_dict(converted)
    _train(model, torch_opt, 1, seed=4)  # torch steps on from there
    # An 8-bit state dict loads into an fp32-moment selopt group directly, dequantized.
    fp32_groups = [{**group, "moment_dtype": None} for group in saved["param_groups"]]
    plain = selopt.MoFO(model.parameters(), lr=1e-2, fraction=0.25)
    plain.load_state_dict({**saved, "param_groups": fp32_groups})
    assert torch.equal(plain.state[weight]["exp_avg_sq"], expected) and "exp_avg_sq_scale" not in plain.state[weight]


@pytest.mark.parametrize(("change", "message"), [
    (lambda e: e.pop("exp_avg_scale"), "go with 'exp_avg_scale'"),
    (lambda e: e.__setitem__("exp_avg_scale", torch.zeros(3, 1)), "must be fp32 scales of shape"),
    (lambda e: e.__setitem__("exp_avg_sq_scale", torch.zeros(96, 1, dtype=torch.float16)), "must be fp32 scales"),
])
def test_bad_8bit_checkpoints_are_refused_whole(change, message):
    model, opt = _trained("8bit")
    saved = copy.deepcopy(opt.state_dict())
    change(saved["state"][0])
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(saved)
    after = opt.state_dict()
    assert all(torch.equal(before["state"][i][k], after["state"][i][k]) for i in before["state"] for k in before["state"][i])


def test_memory_bench_counts_allocated_state(tmp_path):
    from bench import memory

    report = memory.main(["--quick", "--out", str(tmp_path / "memory.json")])
    by_moments = {record["moments"]: record for record in report["records"]}
    assert by_moments["fp32 moments"]["matrices"]["bytes_per_param"] == pytest.approx(8.0, abs=1e-3)
    assert by_moments["bf16 moments"]["matrices"]["bytes_per_param"] == pytest.approx(4.0, abs=1e-3)
    # Codes 2 x 1 B, scales 2 x 4 B per 256 entries, plus a 4-byte step count per tensor.
    assert 2.031 <= by_moments["8-bit moments"]["matrices"]["bytes_per_param"] < 2.1
    assert by_moments["8-bit moments"]["1-D"]["bytes_per_param"] > 8  # norms keep fp32 moments
