"""The GPU truths Triton's interpreter hides (issue 22), checked under it: program order and hints.

Every kernel path (dense, one-pass blocks, exact with its candidate list read and
missed, exact over segments, the sharded exact path, soft masks by row and in
full, on the update and on the grad) steps bitwise the same with each launch's
programs reversed and shuffled as in order, stochastic rounding on and off; the
cases share out the options so that every kernel flag is on in one of them.
The hint checks (tests/interpreter_checks.py) run in every test of the run;
here both checks are shown to catch a planted bug.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import selopt
from selopt.bucket import Bucket
from selopt.options import AdamWOptions
from tests.interpreter_checks import INTERPRETING, NO_INTERPRETER, FalseHint, checked, install

triton = pytest.importorskip("triton", reason="the kernel checks need Triton (pip install 'selopt[triton]')")
if not INTERPRETING:
    pytest.skip(NO_INTERPRETER, allow_module_level=True)

import triton.language as tl  # noqa: E402  (after the skip: the kernels below need the interpreter)

from selopt import kernels  # noqa: E402
from selopt.kernels import block, select_state, tables  # noqa: E402

ORDERS = ["reversed", 7]  # a seed: each launch gets its own shuffle


@dataclasses.dataclass(frozen=True)
class Case:
    """One bucket stepped a few times: its path (``block_size``), the options it turns on, its grads per step."""

    block_size: int | None
    fraction: float = 0.25
    dtype: torch.dtype = torch.float32  # the params' without stochastic rounding (with it: bf16)
    moment_dtype: torch.dtype = torch.float32
    flags: frozenset = frozenset()  # of compile_check.OPTIONS but soft masks and stochastic rounding
    soft_mask: str | None = None  # "rows update", "full grad", ...
    # More than one program per launch on every path; multiples of 8 entries, so that the 128-bit variant runs.
    shapes: tuple = ((3, 704), (304,), (5000,))
    grads: tuple = ("random",)  # per step: "random", "steady" (m's threshold holds), "jump" (it leaves the window)
    sharded: bool = False
    # Exact path: per step, per row, whether it refined from its candidate list (1) or from m (0).
    from_list: tuple | None = None
    aligned: bool = True  # the 128-bit variant, with its hints


READ_THEN_MISSED = ((0, 0, 0), (1, 1, 1), (0, 0, 0))  # no window yet, the list read, the list missed
CASES = {
    "dense": Case(None, 1.0, flags=frozenset({"lr_on_device", "grad_scale", "found_inf"}), soft_mask="rows update"),
    "block 256": Case(256, 0.25, flags=frozenset({"amsgrad", "maximize", "decay_selected", "selections"}),
                      soft_mask="full grad", shapes=((3, 304), (304,), (1000,))),
    "block 64 generic": Case(64, 0.3, torch.float16, flags=frozenset({"beta1_below_half"}),
                             shapes=((5, 13), (301,)), aligned=False),  # not whole multiples of 8
    "exact": Case(None, 0.15, flags=frozenset({"amsgrad", "selections", "beta1_below_half"}), soft_mask="rows grad",
                  grads=("steady", "steady", "jump"), from_list=((0, 0, 0), (0, 0, 1), (0, 0, 0))),
    "exact segments": Case(2 * block.MAX_BLOCK, 0.1, moment_dtype=torch.bfloat16,
                           flags=frozenset({"decay_selected", "beta1_below_half", "found_inf"}),
                           soft_mask="full update", shapes=((9000,),), grads=("steady", "steady"),
                           from_list=((0, 0), (1, 1))),
    "exact sharded": Case(None, 0.2, flags=frozenset({"beta1_below_half", "grad_scale"}),
                          grads=("steady", "steady", "jump"), sharded=True, from_list=READ_THEN_MISSED),
}


def grads_for(kind: str, steady: list[torch.Tensor], gen: torch.Generator) -> list[torch.Tensor]:
    if kind == "random":
        return [torch.randn(s.shape, generator=gen) for s in steady]
    noisy = [s + 0.01 * torch.randn(s.shape, generator=gen) for s in steady]
    return [30 * g for g in noisy] if kind == "jump" else noisy


def new_bucket(case: Case, stochastic_rounding: bool, gen: torch.Generator) -> tuple[Bucket, list[torch.Tensor]]:
    """The case's bucket, every optional column it uses filled, and the steady gradients its m starts at."""
    dtype, moment_dtype = torch.bfloat16 if stochastic_rounding else case.dtype, case.moment_dtype
    steady = [torch.randn(s, generator=gen) for s in case.shapes]
    params = [torch.randn(s, generator=gen).to(dtype) for s in case.shapes]
    masks = None
    if case.soft_mask:
        masks = [torch.rand(s[:1] if case.soft_mask.startswith("rows") else s, generator=gen) for s in case.shapes]
        if len(masks) > 1:
            masks[-1] = None  # tensors without a mask share the launch
    bucket = Bucket(
        params, [torch.zeros(s, dtype=dtype) for s in case.shapes], [s.to(moment_dtype) for s in steady],
        [0.1 * torch.rand(s, generator=gen).to(moment_dtype) for s in case.shapes],
        [torch.tensor(2.0) for _ in case.shapes],
        max_exp_avg_sqs=[0.2 * torch.rand(s, generator=gen).to(moment_dtype) for s in case.shapes]
        if "amsgrad" in case.flags else None,
        soft_masks=masks,
        rounding_seeds=[torch.tensor(i + 1, dtype=torch.int64) for i in range(len(params))] if stochastic_rounding
        else None,
        selections=[torch.zeros(s, dtype=torch.bool) for s in case.shapes] if "selections" in case.flags else None)
    return bucket, steady


def options_for(case: Case, stochastic_rounding: bool) -> AdamWOptions:
    flags = case.flags
    return AdamWOptions(
        lr=torch.tensor(1e-3) if "lr_on_device" in flags else 1e-3,
        betas=(0.3 if "beta1_below_half" in flags else 0.9, 0.999), weight_decay=0.01, amsgrad="amsgrad" in flags,
        maximize="maximize" in flags, fraction=case.fraction, block_size=case.block_size,
        decay="selected" if "decay_selected" in flags else "all",
        soft_mask_mode=case.soft_mask.split()[1] if case.soft_mask else "update",
        stochastic_rounding=stochastic_rounding)


def run(case: Case, stochastic_rounding: bool) -> tuple[dict[str, list[torch.Tensor]], list[list[int]], bool]:
    """Step the case's bucket once per entry of ``case.grads``: every tensor the steps leave, per step
    which rows of the exact path refined from their candidate list (1) rather than m (0), and
    whether the steps took the 128-bit variant."""
    gen = torch.Generator().manual_seed(0)
    bucket, steady = new_bucket(case, stochastic_rounding, gen)
    options, cache = options_for(case, stochastic_rounding), tables.PlanCache()
    scale = 2.0 if "grad_scale" in case.flags else 1.0  # grads arrive scaled; the kernels unscale them
    step = dict(grad_scale=torch.tensor(scale) if "grad_scale" in case.flags else None,
                found_inf=torch.tensor(0.0) if "found_inf" in case.flags else None, cache=cache)
    from_list = []
    for kind in case.grads:
        for grad, new in zip(bucket.grads, grads_for(kind, steady, gen)):
            grad.copy_(scale * new)
        if case.sharded:
            # One shard of two equal ones: k over twice the tensor, each radix round's histogram summed
            # with the other shard's, as selopt.distributed's exchange does.
            kernels.prepare_adamw(bucket, options, **step, whole_numels=[2 * p.numel() for p in bucket.params],
                                  combine=lambda histogram: histogram.mul_(2))()
        else:
            kernels.multi_tensor_adamw_(bucket, options, **step)
        from_list += [state[:, select_state.STATE_FROM_LIST.value].tolist() for _, state in cache.selection_states()]
    # The candidate lists are left out: a tile's slots in them are handed out by an atomic, in whatever order
    # the tiles come, by design; what is read from them is counted, and counts do not depend on the order.
    outputs = {name: [t for t in column if t is not None] for name, column in bucket.fields() if column is not None}
    outputs["select_state"] = [relative_list_addresses(state) for _, state in cache.selection_states()]
    return outputs, from_list, next(iter(cache._plans.values())).aligned


def relative_list_addresses(state: torch.Tensor) -> torch.Tensor:
    """The select state with each row's candidate list address taken from the first's (runs allocate elsewhere)."""
    state, column = state.clone(), select_state.STATE_CANDIDATES.value
    state[:, column] -= state[0, column].item()
    return state


def bitwise_differences(expected: dict, actual: dict) -> list[str]:
    """The tensors of ``actual`` whose bits differ from ``expected``'s, by name and index."""
    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.detach().reshape(-1).view(torch.uint8)

    return [f"{name}[{i}]" for name in expected for i, (e, a) in enumerate(zip(expected[name], actual[name]))
            if not torch.equal(bits(e), bits(a))]


@pytest.mark.parametrize("stochastic_rounding", [False, True], ids=["round to nearest", "stochastic rounding"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_path_steps_bitwise_the_same_whatever_order_the_programs_run(case, stochastic_rounding, program_order):
    expected, from_list, aligned = run(CASES[case], stochastic_rounding)
    assert aligned == CASES[case].aligned
    if CASES[case].from_list:
        assert from_list == [list(step) for step in CASES[case].from_list]  # both ways of refining were taken
    for order in ORDERS:
        with program_order(order):
            actual, _, _ = run(CASES[case], stochastic_rounding)
        differences = bitwise_differences(expected, actual)
        assert not differences, f"programs run {order}: {differences}"


def train(block_size: int | None, steps: int = 3) -> dict[str, list[torch.Tensor]]:
    """A small model's params and optimizer state after ``steps`` MoFO steps on the kernels (the first
    builds the launches, the others replay them)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 32), torch.nn.Linear(32, 3))
    opt = selopt.MoFO(model.parameters(), lr=1e-2, fraction=0.2, block_size=block_size, backend="triton")
    x = torch.randn(16, 40)
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    state = [t for p in model.parameters() for t in opt.state[p].values() if isinstance(t, torch.Tensor)]
    return {"params": list(model.parameters()), "state": state}


@pytest.mark.parametrize("block_size", [512, None], ids=["block 512", "exact"])
def test_optimizer_steps_bitwise_the_same_whatever_order_the_programs_run(block_size, program_order):
    expected = train(block_size)
    for order in ORDERS:
        with program_order(order):
            assert not bitwise_differences(expected, train(block_size)), f"programs run {order}"


# ---------------------------------------------------------------- the reordering itself, and a planted race


@triton.jit
def _record_order(visits, counter):
    """Each program writes its row-major number into the next free slot of ``visits``."""
    slot = tl.atomic_add(counter, 1)
    program = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
    tl.store(visits + slot, program)


def visit_order(grid: tuple[int, ...]) -> list[int]:
    visits = torch.full((int(torch.tensor(grid).prod()),), -1, dtype=torch.int32)
    counter = torch.zeros((), dtype=torch.int32)
    _record_order[grid](visits, counter)
    return visits.tolist()


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("grid", [(5,), (2, 3), (2, 2, 3)])
def test_reordered_runs_every_program_once_in_the_new_order(grid, order, program_order):
    n = int(torch.tensor(grid).prod())
    with program_order(order):
        visited = visit_order(grid)
    assert sorted(visited) == list(range(n))
    assert visited == list(range(n))[::-1] if order == "reversed" else visited != list(range(n))
    assert visit_order(grid) == list(range(n))  # in order again once the block ends


@triton.jit
def _reads_neighbour(buffer):
    """Program i writes ``buffer[i + 1] = buffer[i] + 1``, reading what program i - 1 wrote: a race on a GPU."""
    i = tl.program_id(0)
    tl.store(buffer + i + 1, tl.load(buffer + i) + 1)


@pytest.mark.parametrize("order", ORDERS)
def test_order_check_catches_a_program_reading_its_neighbours_output(order, program_order):
    def run_race() -> dict[str, list[torch.Tensor]]:
        buffer = torch.zeros(9, dtype=torch.int32)
        _reads_neighbour[(8,)](buffer)
        return {"buffer": [buffer]}

    in_order = run_race()
    assert in_order["buffer"][0].tolist() == list(range(9))  # in order, the race goes unseen
    with program_order(order):
        assert bitwise_differences(in_order, run_race()) == ["buffer[0]"]


# ---------------------------------------------------------------- planted false hints


@triton.jit
def _hinted_gather(source, out, OFFSET: tl.constexpr, STRIDE: tl.constexpr, GROUP: tl.constexpr,
                   HINT: tl.constexpr):
    """``out[i] = source[OFFSET + (i // GROUP) * STRIDE]`` for 16 lanes, ``HINT`` made on the pointers."""
    lanes = tl.arange(0, 16)
    pointers = source + OFFSET + (lanes // GROUP) * STRIDE
    if HINT == "multiple_of":
        pointers = tl.multiple_of(pointers, 16)  # bytes
    if HINT == "max_contiguous":
        pointers = tl.max_contiguous(pointers, 8)  # elements
    if HINT == "max_constancy":
        pointers = tl.max_constancy(pointers, 4)
    tl.store(out + lanes, tl.load(pointers))


@pytest.mark.parametrize(("hint", "offset", "stride", "group", "false_because"), [
    ("multiple_of", 0, 1, 1, None),  # one run of 16 fp32 from a 16-byte aligned address
    ("multiple_of", 1, 1, 1, "the first of a run of 16 contiguous values, is not a multiple"),
    ("multiple_of", 0, 4, 1, None),  # no run, every address aligned
    ("multiple_of", 0, 2, 1, "the first of a run of 1 contiguous values, is not a multiple"),
    ("max_contiguous", 0, 1, 1, None),
    ("max_contiguous", 0, 2, 1, "entry 1 is "),
    ("max_constancy", 0, 1, 4, None),
    ("max_constancy", 0, 1, 2, "entry 2 is "),
])
def test_hint_check_catches_a_false_hint(hint, offset, stride, group, false_because):
    source, out = torch.arange(64, dtype=torch.float32), torch.zeros(16)
    assert source.data_ptr() % 16 == 0
    held = checked[hint]
    if false_because is None:
        _hinted_gather[(1,)](source, out, offset, stride, group, hint)
        assert checked[hint] == held + 1
        return
    with pytest.raises(Exception) as raised:
        _hinted_gather[(1,)](source, out, offset, stride, group, hint)
    message = false_hint_message(raised.value)
    promised = {"multiple_of": 16, "max_contiguous": 8, "max_constancy": 4}[hint]
    assert f"tl.{hint}(x, [{promised}]) is false in _hinted_gather" in message and false_because in message, message


def false_hint_message(error: BaseException) -> str:
    """The :class:`FalseHint` behind ``error`` (the interpreter and selopt's launches wrap it)."""
    while error is not None and not isinstance(error, FalseHint):
        error = error.__cause__ or error.__context__
    assert error is not None, "no FalseHint raised"
    return str(error)


@pytest.mark.parametrize(("numel", "offset", "false_hint"), [
    (64, 1, "tl.multiple_of(x, [16]) is false in stream"),  # the params 2 bytes past a 16-byte boundary
    (60, 0, "tl.multiple_of(x, [8]) is false in tile_of"),  # a segment that is not a multiple of 8
], ids=["misaligned address", "segment not a multiple of 8"])
@pytest.mark.parametrize("block_size", [None, 256], ids=["exact", "block"])
def test_hint_check_catches_a_wrong_host_alignment_check(monkeypatch, numel, offset, false_hint, block_size):
    # The host's check (tables._build_plan) planted wrong: every plan takes the 128-bit variant.
    plan = tables.Plan
    monkeypatch.setattr(tables, "Plan", lambda **fields: plan(**{**fields, "aligned": True}))
    param = torch.zeros(offset + numel, dtype=torch.bfloat16)[offset:]
    bucket = Bucket([param], [torch.ones(numel, dtype=torch.bfloat16)], [torch.zeros(numel)], [torch.zeros(numel)],
                    [torch.tensor(0.0)])
    with pytest.raises(Exception) as raised:
        kernels.multi_tensor_adamw_(bucket, AdamWOptions(fraction=0.5, block_size=block_size))
    assert false_hint in false_hint_message(raised.value)


# ---------------------------------------------------------------- a Triton whose interpreter changed


@pytest.mark.parametrize("missing", ["_patch_lang_core", "interpreter_builder"])
def test_install_fails_loudly_on_an_interpreter_without_what_it_patches(monkeypatch, missing):
    from triton.runtime import interpreter

    monkeypatch.delattr(interpreter, missing)
    with pytest.raises(RuntimeError, match="update tests/interpreter_checks.py"):
        install()


def test_reordering_fails_loudly_on_a_grid_loop_that_is_not_row_major(program_order):
    from triton.runtime.interpreter import interpreter_builder

    interpreter_builder.set_grid_dim(2, 1, 1)
    with program_order("reversed"), pytest.raises(RuntimeError, match="out of row-major order"):
        interpreter_builder.set_grid_idx(1, 0, 0)  # a loop that starts anywhere but program 0
