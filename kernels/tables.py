"""Host side of a launch: the table that lets one launch reach every tensor of a bucket.

A *plan* holds the device tensors a launch needs (the table of rows, the
program-to-row map, each tensor's step-count address and step-scalars row
and, for the exact path, the radix-select scratch). A :class:`PlanCache`,
owned by an optimizer, keeps plans by the addresses and sizes they describe,
so a training loop whose tensors stay put builds each one once: no
host-to-device copy after the first step, which is what lets a step run under
``torch.cuda.set_sync_debug_mode("error")`` and be captured in a CUDA graph
(warm up once before capturing, as usual).
"""

from __future__ import annotations

import dataclasses
import functools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from selopt import quantization
from selopt.bucket import Bucket
from selopt.kernels import device as d
from selopt.kernels import select_state
from selopt.kernels.select_state import RadixScratch
from selopt.kernels.launch import KernelCompileError
from selopt.options import AdamWOptions
from selopt.selection import block_k


@dataclass(frozen=True)
class Replay:
    """A param group's last prepared step (:meth:`PlanCache.replay`)."""

    partition: list[list[int]]  # per bucket: its params' positions among the group's stepped params
    layouts: list[tuple]  # per bucket: Bucket.layout() as prepared
    options: AdamWOptions
    grad_scale: Tensor | None
    found_inf: Tensor | None
    relaunches: list[Callable]  # per bucket: the launches for new options, grad_scale, found_inf
    launches: list[list]  # per bucket: the launches of the last step


@dataclass(frozen=True)
class Plan:
    table: Tensor  # int64 [rows, NUM_COLUMNS]
    program_rows: Tensor  # int64 [programs]: the row each program works on
    steps: Tensor  # int64 [tensors]: address of each tensor's fp32 step count
    step_scalars: Tensor  # fp32 [tensors, STEP_SCALARS], written by the step's first launch
    num_tensors: int
    num_rows: int
    num_programs: int
    aligned: bool  # 16-byte aligned addresses, rows of a multiple of 8 elements: 128-bit accesses
    scratch: RadixScratch | None  # exact path: shared by the plans of the same params

    def arguments(self) -> dict:
        """The plan's kernel arguments, by the kernels' parameter names (and ALIGNED, a constexpr)."""
        scratch = self.scratch
        histogram, select_state = (None, None) if scratch is None else (scratch.histogram, scratch.select_state)
        return dict(table=self.table, program_rows=self.program_rows, steps=self.steps,
                    step_scalars=self.step_scalars, histogram=histogram, select_state=select_state,
                    ALIGNED=self.aligned)


def _address(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _to_device(values: list[int], device: torch.device) -> Tensor:
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        # Pinned + non_blocking: the copy is queued on the stream, the host does not wait.
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class PlanCache:
    """The plans and radix scratch of one optimizer: built on first use, reused while tensors stay put.

    The most recent ``size`` plans are kept. Plans used while a CUDA graph was
    being captured are kept for the life of the cache, whatever the LRU evicts:
    the graph replays their device pointers.
    """

    def __init__(self, size: int = 64):
        self.size = size
        self._plans: OrderedDict[tuple, Plan] = OrderedDict()
        self._captured: dict[tuple, Plan] = {}
        self._scratch: OrderedDict[tuple, RadixScratch] = OrderedDict()
        # Kinds of bucket whose kernels failed to compile (selopt.functional): they step on the
        # reference from then on without building a plan first. Kept by clear(): the compiler decides.
        self.falling_back: set[tuple] = set()
        # A step for hundreds of tensors spends most of its host time looking at each tensor. A param
        # group whose tensors stay put replays its last step's launches instead, keyed by the group.
        self.replays: dict[object, Replay] = {}

    def remember(self, key, partition: list[list[int]], buckets: list[Bucket], steps: list, options: AdamWOptions,
                 grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """Keep a param group's prepared step for :meth:`replay`: its ``buckets`` (``partition`` gives their
        params' positions among the group's stepped params), as prepared, and their ``steps``."""
        relaunches = [getattr(step, "relaunch", None) for step in steps]
        if None in relaunches:
            self.replays.pop(key, None)
            return
        self.replays[key] = Replay(partition, [b.layout() for b in buckets], options, grad_scale, found_inf,
                                   relaunches, [step.launches for step in steps])

    def replay(self, key, buckets: list[Bucket], options: AdamWOptions, grad_scale: Tensor | None,
               found_inf: Tensor | None) -> list[list] | None:
        """The launches of a param group's last prepared step, bound to this step's scalars, if its
        ``buckets`` (built by the remembered partition) are laid out as they were; else None.

        A kernel that cannot compile for new scalars returns None too: the
        caller then prepares the group in full, which knows the fallback.
        """
        record = self.replays.get(key)
        if record is None or [b.layout() for b in buckets] != record.layouts:
            return None
        if options is not record.options and not record.options.differ_only_in_scalars(options):
            return None
        if options is not record.options or grad_scale is not record.grad_scale or found_inf is not record.found_inf:
            try:
                launches = [relaunch(options, grad_scale, found_inf) for relaunch in record.relaunches]
            except KernelCompileError:
                return None
            record = self.replays[key] = dataclasses.replace(
                record, options=options, grad_scale=grad_scale, found_inf=found_inf, launches=launches)
        return record.launches

    def get(self, key: tuple, device: torch.device) -> Plan | None:
        capturing = _capturing(device)
        plan = self._plans.get(key) or self._captured.get(key)
        if plan is None:
            if capturing:
                # Building a plan copies its table from the host; a graph would replay that copy from a
                # host buffer that is gone by then. Torch's optimizers ask for the same warm-up.
                raise RuntimeError(
                    "selopt met tensors it has not stepped before while a CUDA graph is being captured: run "
                    "optimizer.step() once on the same tensors (params, grads, state) before capturing"
                )
            return None
        if key in self._plans:
            self._plans.move_to_end(key)
        if capturing:
            self._captured[key] = plan
        return plan

    def put(self, key: tuple, plan: Plan) -> None:
        self._plans[key] = plan
        if len(self._plans) > self.size:
            self._plans.popitem(last=False)

    def selection_states(self) -> list[tuple[tuple[int, ...], Tensor]]:
        """The exact path's select state of each param set: (the params' addresses, ``[rows, select_state.STATE_COLUMNS]``).

        For diagnostics: ``bench.window`` reads which rows were refined from their candidate list.
        """
        return [(key[1], scratch.select_state) for key, scratch in self._scratch.items()]

    def radix_scratch(self, device: torch.device, params: list[Tensor], row_numels: list[int]) -> RadixScratch:
        """The exact path's scratch for ``params`` cut into rows of ``row_numels``: one per param set.

        Keyed by the params, not by the plan: with gradients reallocated each
        step (zero_grad's default) each new address set is a new plan, and the
        select state must outlive it, since each step's threshold is the next
        step's hint. The histogram is left zeroed by the kernels. The most
        recent ``size`` param sets are kept.
        """
        key = (device, tuple([p.data_ptr() for p in params]), tuple(row_numels))
        scratch = self._scratch.get(key)
        if scratch is None:
            scratch = self._scratch[key] = select_state.new_radix_scratch(device, row_numels, _to_device)
            if len(self._scratch) > self.size:
                self._scratch.popitem(last=False)
        self._scratch.move_to_end(key)
        return scratch


def plan_for(cache: PlanCache, bucket: Bucket, *, program_size: int, row_size: int | None, fraction: float,
             select_per_row: bool, whole_numels: list[int] | None = None) -> Plan:
    """The plan for ``bucket``, from ``cache``: built when its addresses and sizes are new.

    Each tensor is cut into rows of ``row_size`` elements (None: one row for
    the whole tensor), each row into programs of ``program_size`` elements (at
    least one, so that empty tensors still get their step). The selection
    block is the program in the one-pass kernel (``select_per_row=False``)
    and the row in the exact path. Selected counts come from
    :func:`selopt.selection.block_k`, on the host, so every path agrees on them.
    ``whole_numels`` (exact path, one row per tensor): the tensors are shards,
    and each row's k is counted over the whole tensor of that many entries.
    """
    params = bucket.params
    device = params[0].device
    key = (select_per_row, device, params[0].dtype, bucket.exp_avgs[0].dtype, program_size, row_size, fraction,
           tuple([p.numel() for p in params]),
           tuple([-1 if m is None else m.numel() for m in bucket.column("soft_masks")]),
           None if whole_numels is None else tuple(whole_numels), bucket.layout())
    plan = cache.get(key, device)
    if plan is None:
        plan = _build_plan(cache, bucket, program_size, row_size, fraction, select_per_row, whole_numels)
        cache.put(key, plan)
    return plan


# Table columns that hold the address of a streamed tensor, offset to the row's start, by bucket field.
_STREAMED_COLUMNS = {"params": d.COL_PARAM, "grads": d.COL_GRAD, "exp_avgs": d.COL_EXP_AVG,
                     "exp_avg_sqs": d.COL_EXP_AVG_SQ, "max_exp_avg_sqs": d.COL_MAX_EXP_AVG_SQ,
                     "selections": d.COL_SELECTION}


# Table columns that hold the address of 8-bit moments' scales, offset to the row's first block, by bucket field.
_SCALE_COLUMNS = {"exp_avg_scales": d.COL_EXP_AVG_SCALE, "exp_avg_sq_scales": d.COL_EXP_AVG_SQ_SCALE}


def _table_rows(bucket: Bucket, program_size: int, row_size: int | None, fraction: float, select_per_row: bool,
                whole_numels: list[int] | None) -> tuple[list[list[int]], list[int]]:
    """The launch table's rows (``d.COL_*``) and the program-to-row map."""
    rows, program_rows = [], []
    for index in range(len(bucket)):
        tensors = bucket.tensors(index)
        numel = tensors["params"].numel()
        mask = tensors["soft_masks"]
        length = numel if row_size is None else row_size
        for start in range(0, max(numel, 1), max(length, 1)):
            n = min(length, numel - start)
            row = [0] * d.NUM_COLUMNS.value
            for name, column in _STREAMED_COLUMNS.items():
                t = tensors[name]
                row[column.value] = 0 if t is None else t.data_ptr() + start * t.element_size()
            for name, column in _SCALE_COLUMNS.items():
                scales = tensors[name]
                if scales is not None:  # rows start on a quant block (row_size is a multiple of it)
                    block = quantization.block_of(tensors["exp_avgs"], scales)
                    row[column.value] = scales.data_ptr() + start // block * scales.element_size()
            row[d.COL_SOFT_MASK.value] = _address(mask)
            row[d.COL_ROUNDING_SEED.value] = _address(tensors["rounding_seeds"])
            row[d.COL_NUMEL.value] = n
            selected_from = n if whole_numels is None else whole_numels[index]
            row[d.COL_K_FULL.value] = block_k(fraction, selected_from if select_per_row else program_size)
            row[d.COL_K_TAIL.value] = block_k(fraction, n % program_size or program_size)
            row[d.COL_MASK_DIV.value] = 0 if mask is None else max(numel // max(mask.numel(), 1), 1)
            row[d.COL_FIRST_PROGRAM.value] = len(program_rows)
            row[d.COL_OFFSET.value] = start
            row[d.COL_TENSOR.value] = index
            # At least one program per row, so that an empty tensor still gets its row.
            program_rows += [len(rows)] * max(1, -(-n // program_size))
            rows.append(row)
    return rows, program_rows


def _build_plan(cache: PlanCache, bucket: Bucket, program_size: int, row_size: int | None, fraction: float,
                select_per_row: bool, whole_numels: list[int] | None) -> Plan:
    params, device = bucket.params, bucket.params[0].device
    for name in ("params", "grads", "exp_avgs"):
        # Checked when a plan is built, which any new address set triggers: a model moved after its
        # state was made would otherwise hand the kernels foreign pointers.
        column = getattr(bucket, name)
        if {t.device for t in column} != {device}:
            raise ValueError(f"{name} must all be on {device}, got {sorted({str(t.device) for t in column})}")
    rows, program_rows = _table_rows(bucket, program_size, row_size, fraction, select_per_row, whole_numels)
    streams = (d.COL_PARAM, d.COL_GRAD, d.COL_EXP_AVG, d.COL_EXP_AVG_SQ, d.COL_MAX_EXP_AVG_SQ)
    aligned = program_size % 8 == 0 and all(
        row[d.COL_NUMEL.value] % 8 == 0 and all(row[c.value] % 16 == 0 for c in streams) for row in rows)
    scratch = cache.radix_scratch(device, params, [row[d.COL_NUMEL.value] for row in rows]) if select_per_row else None
    num_rows, num_programs, num_tensors = len(rows), len(program_rows), len(params)
    # One host-to-device copy for the table, the program map and the step addresses.
    packed = _to_device([x for row in rows for x in row] + program_rows + [t.data_ptr() for t in bucket.steps],
                        device)
    table_end = num_rows * d.NUM_COLUMNS.value
    return Plan(
        table=packed[:table_end].view(num_rows, d.NUM_COLUMNS.value),
        program_rows=packed[table_end:table_end + num_programs],
        steps=packed[table_end + num_programs:],
        step_scalars=torch.zeros(num_tensors, d.STEP_SCALARS.value, dtype=torch.float32, device=device),
        num_tensors=num_tensors,
        num_rows=num_rows,
        num_programs=num_programs,
        aligned=aligned,
        scratch=scratch,
    )


@functools.cache
def code_tables(device: torch.device) -> tuple[Tensor, Tensor]:
    """The 8-bit moments' lookup tables on ``device``, built once (``d.SIGNED_MAP`` ... ``d.UNSIGNED_BUCKETS``):
    the fp32 code maps and decision points, and the uint8 bucket table of :func:`selopt.kernels.device.code_of`.

    Raises if a bucket holds more than one decision point: the two lookups would then miss one.
    """
    values, buckets = [], []
    top_bits = torch.arange(d.BUCKET_LOW.value, d.BUCKET_LOW.value + d.BUCKETS.value, dtype=torch.int32)
    lows = (top_bits << d.BUCKET_SHIFT.value).view(torch.float32).clone()
    highs = ((top_bits + 1) << d.BUCKET_SHIFT.value).view(torch.float32)
    lows[0] = 0.0  # the first bucket also holds every smaller |y|
    for signed in (True, False):
        points = quantization.decision_points(signed)
        values += [quantization.code_map(signed), torch.cat([points, torch.tensor([float("inf")])])]
        # A value y >= 0 of bucket [low, high): the points <= low, then at most one point in (low, high).
        below = torch.searchsorted(points, lows, right=True)
        inside = torch.searchsorted(points, highs) - below
        if signed:
            # y < 0, |y| in [low, high): the points <= -high, then at most one in (-high, -low].
            below_negative = torch.searchsorted(points, -highs, right=True)
            inside = torch.maximum(inside, torch.searchsorted(points, -lows, right=True) - below_negative)
            buckets += [below, below_negative]
        else:
            buckets.append(below)
        if int(inside.max()) > 1:
            raise AssertionError("a bucket of the 8-bit code search holds two decision points: keep more mantissa bits")
    # Maps first, then points: the d.*_MAP and d.*_POINTS offsets.
    values = torch.cat(values[0::2] + values[1::2])
    assert values.numel() == d.CODE_VALUES
    return values.to(device), torch.cat(buckets).to(torch.uint8).to(device)
