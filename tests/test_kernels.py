"""Triton kernels against the torch reference (docs/design.md §3, tolerances).

Runs on CUDA when there is one, else on CPU under Triton's interpreter
(``TRITON_INTERPRET=1``, as ``make test`` sets it); sizes stay small for the
interpreter. Every output tensor is carved out of a buffer poisoned with NaN,
so writes outside a tensor show up in its guards, and selection outputs start
as random bits, so an unwritten entry shows up as a wrong mask.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from selopt import reference
from selopt.bucket import Bucket as SeloptBucket
from selopt.check import HYPER, step_problems
from selopt.options import AdamWOptions
from tests.grad_fills import mostly_zero, ties, with_nans

triton = pytest.importorskip("triton", reason="the kernel tests need Triton (pip install 'selopt[triton]')")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device: run with TRITON_INTERPRET=1 to check the kernels on CPU", allow_module_level=True)

from selopt import kernels  # noqa: E402  (after the skip: importing needs a usable Triton)
from selopt.kernels import block, exact, select_state, tables  # noqa: E402

GUARD = 64


def multi_tensor_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, options, soft_masks=None,
                        rounding_seeds=None, selections=None, **step):
    """The kernels' checked step on torch-style lists (as the tests write their buckets)."""
    kernels.multi_tensor_adamw_(SeloptBucket(params, grads, exp_avgs, exp_avg_sqs, steps, max_exp_avg_sqs,
                                             soft_masks, rounding_seeds, selections), options, **step)


def guarded(shape, dtype, fill: torch.Tensor | None = None) -> torch.Tensor:
    """A tensor of ``shape`` inside a NaN-poisoned buffer; ``fill`` gives its values."""
    numel = int(torch.Size(shape).numel())
    buffer = torch.full((numel + 2 * GUARD,), float("nan"), dtype=dtype, device=DEVICE)
    inside = buffer[GUARD:GUARD + numel].view(shape)
    if fill is not None:
        inside.copy_(fill)
    return inside


def guards_intact(t: torch.Tensor) -> bool:
    base = t.view(-1)
    storage = torch.as_strided(base, (t.numel() + 2 * GUARD,), (1,), t.storage_offset() - GUARD)
    return bool(storage[:GUARD].isnan().all() and storage[GUARD + t.numel():].isnan().all())


STEP_ARGUMENTS = ("grad_scale", "found_inf")  # the step's other keywords are AdamWOptions'


def options_and_arguments(amsgrad: bool, keywords: dict) -> tuple[AdamWOptions, dict]:
    options = {k: v for k, v in keywords.items() if k not in STEP_ARGUMENTS}
    return AdamWOptions(**options, amsgrad=amsgrad), {k: v for k, v in keywords.items() if k in STEP_ARGUMENTS}


class Bucket:
    """Params, grads and state of several tensors, as the optimizer hands them to the kernels."""

    def __init__(self, shapes, dtype=torch.float32, moment_dtype=torch.float32, *, amsgrad=False, seed=0,
                 grad_fill=None, step=3.0, cache=None):
        gen = torch.Generator().manual_seed(seed)
        self.shapes = shapes
        self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs = [], [], [], [], []
        for shape in shapes:
            self.params.append(guarded(shape, dtype, torch.randn(shape, generator=gen)))
            grad = torch.randn(shape, generator=gen) if grad_fill is None else grad_fill(shape, gen)
            self.grads.append(guarded(shape, dtype, grad))
            self.exp_avgs.append(guarded(shape, moment_dtype, 0.1 * torch.randn(shape, generator=gen)))
            self.exp_avg_sqs.append(guarded(shape, moment_dtype, 0.1 * torch.rand(shape, generator=gen)))
            if amsgrad:
                self.max_exp_avg_sqs.append(guarded(shape, moment_dtype, 0.12 * torch.rand(shape, generator=gen)))
        self.steps = [torch.tensor(step, device=DEVICE) for _ in shapes]
        self.amsgrad = amsgrad
        self.selections = [torch.randint(0, 2, s, generator=gen).bool().to(DEVICE) for s in shapes]
        self.cache = tables.PlanCache() if cache is None else cache
        self.before = self.snapshot()

    def snapshot(self):
        return [[t.clone() for t in column] for column in (self.params, self.exp_avgs, self.exp_avg_sqs,
                                                           self.max_exp_avg_sqs, self.steps)]

    def step(self, soft_masks=None, **keywords):
        options, arguments = options_and_arguments(self.amsgrad, keywords)
        multi_tensor_adamw_(
            self.params, self.grads, self.exp_avgs, self.exp_avg_sqs,
            self.max_exp_avg_sqs if self.amsgrad else None, self.steps, options=options, soft_masks=soft_masks,
            selections=self.selections, cache=self.cache, **arguments)

    def check(self, soft_masks=None, grad_scale=None, **options):
        """Nothing written outside a tensor; every tensor as :func:`selopt.check.step_problems` wants it."""
        for i, shape in enumerate(self.shapes):
            p, m, v = self.params[i], self.exp_avgs[i], self.exp_avg_sqs[i]
            for t in (p, self.grads[i], m, v, *self.max_exp_avg_sqs[i:i + 1]):
                assert guards_intact(t), f"tensor {i} {shape}: write outside the tensor"
            old_p, old_m, old_v, old_vmax, old_step = (column[i] if column else None for column in self.before)
            before = dict(param=old_p, grad=self.grads[i], exp_avg=old_m, exp_avg_sq=old_v,
                          max_exp_avg_sq=old_vmax, step=old_step)
            after = dict(param=p, exp_avg=m, exp_avg_sq=v, max_exp_avg_sq=self.max_exp_avg_sqs[i] if self.amsgrad
                         else None, step=self.steps[i], selection=self.selections[i])
            problems = step_problems(before, after, soft_mask=None if soft_masks is None else soft_masks[i],
                                     grad_scale=grad_scale, options=AdamWOptions(**{**HYPER, **options},
                                                                                 amsgrad=self.amsgrad))
            assert not problems, f"tensor {i} {shape}: {problems}"


ODD_SHAPES = [(1,), (0,), (255,), (256,), (257,), (3, 333), (2, 2, 129)]


@pytest.mark.parametrize("block_size", [256, 1024, 8192])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 1.0])
def test_block_kernel_matches_reference_fp32(block_size, fraction):
    bucket = Bucket(ODD_SHAPES + [(2 * block_size + 5,)], seed=block_size)
    options = dict(HYPER, fraction=fraction, block_size=block_size)
    bucket.step(**options)
    bucket.check(**options)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("moment_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [512, None])
def test_low_precision_matches_reference(dtype, moment_dtype, block_size):
    bucket = Bucket([(1,), (300,), (5, 1001)], dtype, moment_dtype, seed=7)
    options = dict(HYPER, fraction=0.2, block_size=block_size)
    bucket.step(**options)
    bucket.check(**options)


@pytest.mark.parametrize("block_size", [None, 32768])
@pytest.mark.parametrize("fraction", [0.03, 0.5])
def test_exact_path_matches_reference(block_size, fraction):
    # Straddles the exact path's chunks; 32768 is above the one-pass limit, so it is exact per block.
    shapes = ODD_SHAPES + [(exact.CHUNK + 3,), (3, exact.CHUNK - 1)]
    if block_size is not None:
        shapes.append((block_size * 2 + 17,))
    bucket = Bucket(shapes, seed=11)
    options = dict(HYPER, fraction=fraction, block_size=block_size)
    bucket.step(**options)
    bucket.check(**options)


WINDOW_SHAPES = [(5000,), (3, exact.CHUNK + 3), (40, 130), (1,), (0,)]


def window_steps(bucket: Bucket, grads, options: dict, soft_masks=None) -> list[list[int]]:
    """Step the bucket once per entry of ``grads`` (a function of the step), checking every step;
    returns, per step, which rows refined their threshold from the candidate list (1) or from m (0)."""
    from_list = []
    for step in range(len(grads)):
        for g, shape in zip(bucket.grads, bucket.shapes):
            g.copy_(grads[step](shape))
        bucket.before = bucket.snapshot()
        bucket.step(soft_masks=soft_masks, **options)
        bucket.check(soft_masks=soft_masks, **options)
        (_, state), = bucket.cache.selection_states()
        from_list.append(state[:, select_state.STATE_FROM_LIST.value].tolist())
    return from_list


@pytest.mark.parametrize("variant", ["fp32", "bf16 moments", "amsgrad, soft masks"])
def test_exact_path_refines_from_the_candidate_list_while_the_threshold_holds_still(variant):
    # m already near steady gradients: the threshold barely moves, so after the first step (no
    # window yet) and at most a step of narrowing the window, refinement reads the list, not m.
    dtype, moment_dtype = (torch.bfloat16, torch.bfloat16) if variant == "bf16 moments" else (torch.float32,) * 2
    amsgrad = variant.startswith("amsgrad")
    bucket = Bucket(WINDOW_SHAPES, dtype, moment_dtype, amsgrad=amsgrad, seed=21)
    gen = torch.Generator().manual_seed(0)
    steady = {s: torch.randn(s, generator=gen) for s in bucket.shapes}
    for m, shape in zip(bucket.exp_avgs, bucket.shapes):
        m.copy_(steady[shape])
    masks = [torch.rand(s[:1], generator=gen).to(DEVICE) if len(s) == 2 else None for s in bucket.shapes]

    def grads(shape):
        return steady[shape] + 0.01 * torch.randn(shape, generator=gen)

    options = dict(HYPER, fraction=0.15, block_size=None)
    from_list = window_steps(bucket, [grads] * 5, options, soft_masks=masks if amsgrad else None)
    assert from_list[0] == [0] * len(WINDOW_SHAPES)  # no window before the first threshold
    assert from_list[-1][:3] == [1, 1, 1], from_list


@pytest.mark.parametrize("case", ["jump", "ties", "nans", "blocks"])
def test_exact_path_stays_exact_when_the_window_misses(case):
    # The window is a guess: a threshold that jumps out of it, ties that overflow the list and NaNs
    # still select exactly what the reference selects, with the refinement reading m instead.
    bucket = Bucket(WINDOW_SHAPES, seed=22)
    gen = torch.Generator().manual_seed(1)
    steady = {s: torch.randn(s, generator=gen) for s in bucket.shapes}
    for m, shape in zip(bucket.exp_avgs, bucket.shapes):
        m.copy_(steady[shape])

    def scaled(factor):
        return lambda shape: factor * (steady[shape] + 0.01 * torch.randn(shape, generator=gen))

    options = dict(HYPER, fraction=0.15, block_size=None)
    if case == "jump":
        from_list = window_steps(bucket, [scaled(1.0)] * 3 + [scaled(30.0)], options)
        assert from_list[2][:3] == [1, 1, 1] and from_list[3][:3] == [0, 0, 0], from_list
    elif case == "ties":
        # Every |g| equal: every key in the window, far more than a list holds.
        from_list = window_steps(bucket, [lambda shape: torch.randint(0, 2, shape, generator=gen) * 2.0 - 1] * 4,
                                 options)
        assert all(row[:3] == [0, 0, 0] for row in from_list), from_list
    elif case == "nans":
        def nans(shape):
            return scaled(1.0)(shape).masked_fill(torch.rand(shape, generator=gen) < 0.2, float("nan"))
        window_steps(bucket, [scaled(1.0)] * 2 + [nans] * 2, options)
    else:
        # Blocks above the one-pass limit: one list per block, several rows per tensor.
        bucket = Bucket([(2 * 3 * block.MAX_BLOCK + 5,)], seed=23)
        window_steps(bucket, [lambda shape: torch.randn(shape, generator=gen)] * 3,
                     dict(options, block_size=2 * block.MAX_BLOCK))


@pytest.mark.parametrize("block_size", [256, None])
def test_options_amsgrad_maximize_decay_selected_small_beta1(block_size):
    bucket = Bucket([(7, 65), (1000,)], amsgrad=True, seed=3)
    options = dict(HYPER, betas=(0.3, 0.999), fraction=0.25, block_size=block_size, maximize=True, decay="selected")
    bucket.step(**options)
    bucket.check(**options)


@pytest.mark.parametrize("block_size", [256, None])
@pytest.mark.parametrize("mode", ["update", "grad"])
@pytest.mark.parametrize("per_row", [True, False])
def test_soft_masks(block_size, mode, per_row):
    shapes = [(6, 70), (300,), (4, 9)]
    bucket = Bucket(shapes, seed=5)
    gen = torch.Generator().manual_seed(1)
    masks = [torch.rand(s[:1] if per_row else s, generator=gen).to(DEVICE) for s in shapes]
    masks[1] = None  # tensors without a mask share the launch
    options = dict(HYPER, fraction=0.3, block_size=block_size, soft_mask_mode=mode)
    bucket.step(soft_masks=masks, **options)
    bucket.check(soft_masks=masks, **options)


@pytest.mark.parametrize("grad_fill", [ties, with_nans, mostly_zero])
@pytest.mark.parametrize("block_size", [256, None])
def test_ties_nans_and_zeros(grad_fill, block_size):
    bucket = Bucket([(1000,), (3, 100), (5,)], grad_fill=grad_fill, seed=9)
    for t in bucket.exp_avgs + bucket.exp_avg_sqs:
        t.zero_()  # m = 0.1 * g: the ties survive, NaN grads give NaN moments, zero grads zero ones
    bucket.before = bucket.snapshot()
    options = dict(HYPER, fraction=0.3, block_size=block_size)
    bucket.step(**options)
    bucket.check(**options)
    # Non-finite moments always move (as with torch's AdamW), zero ones never do.
    assert all(s[~m.isfinite()].all() for s, m in zip(bucket.selections, bucket.exp_avgs))
    assert not any(s[m == 0].any() for s, m in zip(bucket.selections, bucket.exp_avgs))


def test_all_nan_block_moves_entirely_and_tail_selects_its_k():
    # A block of NaN moments: every entry outranks the finite ones, all k of them tie, all move.
    bucket = Bucket([(512 + 3,)], seed=2)
    bucket.grads[0][:512] = float("nan")
    bucket.exp_avgs[0][:512] = float("nan")
    bucket.before = bucket.snapshot()
    options = dict(HYPER, fraction=0.5, block_size=512)
    bucket.step(**options)
    bucket.check(**options)
    assert bucket.selections[0][:512].all() and bucket.params[0][:512].isnan().all()
    assert int(bucket.selections[0][512:].sum()) == 1


@pytest.mark.parametrize("block_size", [256, None])
def test_grad_scale_and_lr_tensor(block_size):
    bucket = Bucket([(700,), (3, 31)], seed=4)
    for g in bucket.grads:
        g.mul_(1024.0)
    scale = torch.tensor(1024.0, device=DEVICE)
    lr = torch.tensor(HYPER["lr"], device=DEVICE)
    options = dict(HYPER, fraction=0.4, block_size=block_size)
    bucket.step(grad_scale=scale, found_inf=torch.zeros((), device=DEVICE), **{**options, "lr": lr})
    bucket.check(grad_scale=scale, **options)


@pytest.mark.parametrize("block_size", [256, None])
def test_found_inf_changes_nothing(block_size):
    bucket = Bucket([(700,), (3, 31)], amsgrad=True, seed=6)
    bucket.step(found_inf=torch.ones((), device=DEVICE), fraction=0.4, block_size=block_size, **HYPER)
    for before, after in zip(bucket.before, bucket.snapshot()):
        for b, a in zip(before, after):
            assert torch.equal(b.view(torch.uint8) if b.dim() else b, a.view(torch.uint8) if a.dim() else a)


@pytest.mark.parametrize("block_size", [256, None])
def test_several_steps_match_reference_step(block_size):
    # Steps, bias corrections and the cached launch plan across calls.
    bucket = Bucket([(600,), (2, 50)], seed=8, step=0.0)
    states = [{"step": torch.tensor(0.0), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
              for m, v in zip(bucket.exp_avgs, bucket.exp_avg_sqs)]
    params = [p.clone() for p in bucket.params]
    options = dict(HYPER, fraction=0.2, block_size=block_size)
    for _ in range(3):
        bucket.step(**options)
        for p, g, state in zip(params, bucket.grads, states):
            reference.adamw_step_(p, g, state, options=AdamWOptions(**options))
    for p, want, state, m, step in zip(bucket.params, params, states, bucket.exp_avgs, bucket.steps):
        torch.testing.assert_close(p, want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(m, state["exp_avg"], rtol=1e-6, atol=1e-9)
        assert float(step) == 3.0


def test_launch_plan_is_cached():
    bucket = Bucket([(300,)], seed=1)
    bucket.step(fraction=0.5, block_size=256, **HYPER)
    cached = len(bucket.cache._plans)
    bucket.step(fraction=0.5, block_size=256, **HYPER)
    assert len(bucket.cache._plans) == cached == 1


@pytest.mark.parametrize(("shapes", "block_size", "aligned"), [
    ([(8,), (4, 264), (520,)], None, True),
    ([(8,), (4, 264), (520,)], 64, True),
    ([(8,), (4, 263), (520,)], None, False),  # one size not a multiple of 8
    ([(8,), (4, 263), (520,)], 64, False),
    ([(8,), (24,)], 4, False),  # blocks of fewer than 8 entries
], ids=["exact-aligned", "block-aligned", "exact-generic", "block-generic", "small-block-generic"])
def test_aligned_and_generic_variants_match_reference(shapes, block_size, aligned):
    # 16-byte aligned tensors of whole multiples of 8 entries take the 128-bit variant; anything
    # else sends the whole bucket to the generic one.
    bucket = Bucket(shapes, torch.bfloat16, seed=13)
    options = dict(HYPER, fraction=0.2, block_size=block_size)
    bucket.step(**options)
    bucket.check(**options)
    assert next(reversed(bucket.cache._plans.values())).aligned == aligned


def test_plan_used_during_graph_capture_is_never_evicted_or_freed(monkeypatch):
    cache = tables.PlanCache(size=4)
    bucket = Bucket([(300,)], seed=2, cache=cache)
    options = dict(fraction=0.5, block_size=256, **HYPER)
    bucket.step(**options)  # warm-up, outside capture: builds the plan
    monkeypatch.setattr(tables, "_capturing", lambda device: True)
    bucket.step(**options)  # "captured": a graph now holds this plan's device pointers
    captured = [plan for plan in cache._captured.values() if plan.num_rows == 1]
    table_address = captured[-1].table.data_ptr()
    monkeypatch.setattr(tables, "_capturing", lambda device: False)
    for seed in range(cache.size + 1):  # push it out of the LRU
        Bucket([(8 + seed,)], seed=seed, cache=cache).step(**options)
    assert all(plan is not captured[-1] for plan in cache._plans.values())
    assert any(plan is captured[-1] for plan in cache._captured.values())
    assert captured[-1].table.data_ptr() == table_address
    plan_for, used = tables.plan_for, []
    monkeypatch.setattr(tables, "plan_for", lambda *args, **kwargs: used.append(plan_for(*args, **kwargs)) or used[-1])
    bucket.step(**options)  # the same tensors again get the captured plan, not a rebuilt one
    assert used == [captured[-1]] and used[0] is captured[-1]


def test_new_tensors_during_graph_capture_ask_for_a_warm_up(monkeypatch):
    monkeypatch.setattr(tables, "_capturing", lambda device: True)
    bucket = Bucket([(77,)], seed=3)
    with pytest.raises(RuntimeError, match=r"run optimizer.step\(\) once .* before capturing"):
        bucket.step(fraction=0.5, block_size=256, **HYPER)
    assert all(torch.equal(a, b) for a, b in zip(bucket.params, bucket.before[0]))


def test_stochastic_rounding_is_unbiased():
    # 1 - lr lies between two bf16 values; each entry rounds up or down at random, the mean is exact.
    n, lr = 8192, 3e-3
    p = torch.ones(n, dtype=torch.bfloat16, device=DEVICE)
    g = torch.ones(n, dtype=torch.bfloat16, device=DEVICE)
    m, v = torch.zeros(n, device=DEVICE), torch.zeros(n, device=DEVICE)
    step = torch.zeros((), device=DEVICE)
    seed = torch.tensor(12345, device=DEVICE)
    options = AdamWOptions(lr=lr, weight_decay=0.0, block_size=4096, fraction=1.0, stochastic_rounding=True)
    multi_tensor_adamw_([p], [g], [m], [v], None, [step], options=options, rounding_seeds=[seed])
    exact_value = 1.0 - lr  # first Adam step: m_hat / sqrt(v_hat) = 1
    low, high = 1.0 - 2**-8, 1.0
    assert set(p.float().unique().tolist()) <= {low, high}
    up = (high - exact_value) / (high - low)
    sigma = (high - low) * (up * (1 - up) / n) ** 0.5
    assert abs(p.float().mean().item() - exact_value) < 5 * sigma


def test_non_contiguous_params_go_through_a_copy():
    base = Bucket([(40, 30)], seed=12)
    strided = Bucket([(30, 40)], seed=12)
    for column_t, column_b in zip((strided.params, strided.grads, strided.exp_avgs, strided.exp_avg_sqs),
                                  (base.params, base.grads, base.exp_avgs, base.exp_avg_sqs)):
        column_t[0] = column_b[0].detach().clone().t().contiguous().t()
    options = dict(HYPER, fraction=0.2, block_size=None)
    base.step(**options)
    strided.selections = [torch.zeros(40, 30, dtype=torch.bool, device=DEVICE)]
    multi_tensor_adamw_(strided.params, strided.grads, strided.exp_avgs, strided.exp_avg_sqs, None,
                                strided.steps, options=AdamWOptions(**options))
    assert not strided.params[0].is_contiguous()
    torch.testing.assert_close(strided.params[0], base.params[0], rtol=0, atol=0)


def test_trusted_inputs_still_have_their_devices_checked():
    # prepare_adamw (the optimizer's path) trusts shapes and dtypes, never devices: foreign pointers.
    bucket = Bucket([(10,), (7,)], seed=0)
    exp_avgs = [bucket.exp_avgs[0], torch.zeros(7, device="meta")]
    with pytest.raises(ValueError, match="exp_avgs must all be on"):
        kernels.prepare_adamw(SeloptBucket(bucket.params, bucket.grads, exp_avgs, bucket.exp_avg_sqs, bucket.steps),
                              AdamWOptions(**HYPER))


def test_bad_input_raises_before_anything_changes():
    bucket = Bucket([(10,)], seed=0)
    with pytest.raises(ValueError, match="fraction"):
        bucket.step(fraction=0.0, **HYPER)
    with pytest.raises(ValueError, match="block_size"):
        bucket.step(block_size=300, **HYPER)
    with pytest.raises(ValueError, match="grads"):
        multi_tensor_adamw_(bucket.params, [], bucket.exp_avgs, bucket.exp_avg_sqs, None, bucket.steps,
                                    options=AdamWOptions(**HYPER))
    with pytest.raises(TypeError, match="params"):
        p = torch.zeros(3, dtype=torch.float64, device=DEVICE)
        multi_tensor_adamw_([p], [p], [p], [p], None, [torch.zeros((), device=DEVICE)],
                                    options=AdamWOptions(**HYPER))
    with pytest.raises(ValueError, match="rounding_seeds"):
        multi_tensor_adamw_([p.bfloat16()], [p.bfloat16()], [p.float()], [p.float()], None,
                                    [torch.zeros((), device=DEVICE)], options=AdamWOptions(stochastic_rounding=True))
    assert torch.equal(bucket.params[0], bucket.before[0][0])


@pytest.mark.parametrize("block_size", [512, None])
def test_optimizer_triton_backend_matches_torch_backend(block_size):
    import selopt

    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(40, 33), torch.nn.Linear(33, 3)).to(DEVICE) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [selopt.MoFO(model.parameters(), lr=1e-2, fraction=0.2, block_size=block_size, backend=backend)
            for model, backend in zip(models, ("torch", "triton"))]
    x = torch.randn(16, 40, device=DEVICE)
    for _ in range(3):
        for model, opt in zip(models, opts):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_optimizer_replays_a_step_only_while_its_tensors_stay_put():
    # A group whose tensors are where they were last step reruns that step's launches (the host
    # time of a step: no per-tensor bucketing or plan lookup); anything that moves or replaces a
    # tensor, a missing gradient or a new soft mask prepares the step again. Every step equals
    # the torch backend's, manipulations included.
    import selopt

    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(40, 33), torch.nn.Linear(33, 3)).to(DEVICE) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    reference_opt, opt = (selopt.MoFO(model.parameters(), lr=1e-2, fraction=0.2, backend=backend)
                          for model, backend in zip(models, ("torch", "triton")))
    prepared = []
    prepare_group = opt._prepare_group
    opt._prepare_group = lambda *args: prepared.append(1) or prepare_group(*args)
    x = torch.randn(16, 40, device=DEVICE)

    def step(change=lambda model, opt: None):
        for model, o in zip(models, (reference_opt, opt)):
            o.zero_grad(set_to_none=False)  # the same gradient tensors, step after step
            model(x).square().mean().backward()
            change(model, o)
            o.step()
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        return len(prepared)

    def replace_moment(model, o):
        state = o.state[model[0].weight]
        state["exp_avg"] = state["exp_avg"].clone()

    def scale_lr(model, o):
        o.param_groups[0]["lr"] *= 0.5

    def drop_grad(model, o):
        model[1].bias.grad = None

    def soft_mask(model, o):
        o.set_soft_mask(model[0].weight, torch.linspace(0, 1, 33, device=DEVICE))

    def move(model, o):
        model.double().float()  # new storage under the same Parameter objects

    assert step() == 1
    assert step() == 1  # replayed
    assert step(scale_lr) == 1  # replayed with the new lr
    assert step(replace_moment) == 2
    assert step(drop_grad) == 3
    assert step() == 4  # the bias has a gradient again
    assert step(soft_mask) == 5
    assert step(move) == 6
    assert step() == 6

    def relaunch_fails(*args):
        raise kernels.KernelCompileError("_exact_update_kernel", {}, None, RuntimeError("no such instruction"))

    replays = opt.caches["triton"].replays
    (group_id, replay), = replays.items()
    replays[group_id] = dataclasses.replace(replay, relaunches=[relaunch_fails] * len(replay.relaunches))
    assert step(scale_lr) == 7  # new scalars whose kernels would not compile: the full path decides
    # The replacement moment is the one the steps keep updating.
    assert torch.equal(opt.state[models[1][0].weight]["exp_avg"].ne(0), reference_opt.state[
        models[0][0].weight]["exp_avg"].ne(0))


def test_triton_backend_without_triton_says_how_to_install(monkeypatch):
    import selopt
    from selopt import functional

    monkeypatch.setattr(functional, "triton_problem", lambda: "Triton is not installed: `pip install triton`")
    layer = torch.nn.Linear(3, 2).to(DEVICE)
    with pytest.raises(ImportError, match="pip install"):
        opt = selopt.AdamW(layer.parameters(), backend="triton")
        layer(torch.randn(1, 3, device=DEVICE)).sum().backward()
        opt.step()


def test_block_sizes_every_power_of_two_run():
    # All powers of two from 1 to the one-pass limit take the one-pass kernel; small and odd tails.
    for block_size in [2**i for i in range(block.MAX_BLOCK.bit_length())]:
        n = min(3 * block_size + 1, 20000)
        bucket = Bucket([(n,)], seed=block_size)
        options = dict(HYPER, fraction=0.3, block_size=block_size)
        bucket.step(**options)
        bucket.check(**options)
    # Above the one-pass limit, blocks take the exact path.
    bucket = Bucket([(3 * block.MAX_BLOCK,)], seed=1)
    for block_size, last in ((block.MAX_BLOCK, "_block_adamw_kernel"), (2 * block.MAX_BLOCK, "_exact_update_kernel")):
        prepared = kernels.prepare_adamw(
            SeloptBucket(bucket.params, bucket.grads, bucket.exp_avgs, bucket.exp_avg_sqs, bucket.steps),
            AdamWOptions(fraction=0.3, block_size=block_size, **HYPER))
        assert [launch.name for launch in prepared.launches][::len(prepared.launches) - 1] == [
            "_step_scalars_kernel", last]


def test_optimizer_float64_params_fall_back_to_the_reference():
    import selopt

    torch.manual_seed(0)
    layers = [torch.nn.Linear(5, 4).double().to(DEVICE) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    opts = [selopt.MoFO(layer.parameters(), lr=1e-2, fraction=0.5, backend=backend)
            for layer, backend in zip(layers, ("torch", "triton"))]
    x = torch.randn(3, 5, dtype=torch.float64, device=DEVICE)
    for layer, opt in zip(layers, opts):
        layer(x).sum().backward()
        opt.step()
    for a, b in zip(layers[0].parameters(), layers[1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
