"""Host side of a launch: the segment table that lets one launch reach every tensor of a bucket.

A *plan* holds the device tensors a launch needs (the segment table, the
program-to-row map, each tensor's step-count address and step-scalars row
and, for the exact path, the radix-select scratch). Plans are cached
by the addresses and sizes they describe, so a training loop whose tensors
stay put builds each one once: no host-to-device copy after the first step,
which is what lets a step run under ``torch.cuda.set_sync_debug_mode("error")``
and be captured in a CUDA graph (warm up once before capturing, as usual).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from selopt.kernels import _device as d
from selopt.reference import block_k

_CACHE_SIZE = 64
_plans: OrderedDict[tuple, "Plan"] = OrderedDict()
# Plans used while a CUDA graph was being captured: the graph replays their device pointers, so
# they are kept for the life of the process, whatever the LRU above evicts.
_captured_plans: dict[tuple, "Plan"] = {}
_radix_scratch: dict[tuple, tuple[Tensor, Tensor]] = {}


@dataclass(frozen=True)
class Plan:
    table: Tensor  # int64 [rows, NUM_COLUMNS]
    program_rows: Tensor  # int64 [programs]: the row each program works on
    steps: Tensor  # int64 [tensors]: address of each tensor's fp32 step count
    step_scalars: Tensor  # fp32 [tensors, STEP_SCALARS], written by the step's first launch
    num_tensors: int
    num_rows: int
    num_programs: int
    aligned: bool  # 16-byte aligned addresses, segments of a multiple of 8 elements: 128-bit accesses
    histogram: Tensor | None  # int64 [rows, d.RADIX_BINS], zero between launches (exact path)
    select_state: Tensor | None  # int64 [rows, 2]: key prefix and rank left (exact path)


def _address(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _to_device(values: list[int], device: torch.device) -> Tensor:
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        # Pinned + non_blocking: the copy is queued on the stream, the host does not wait.
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _radix_scratch_for(device: torch.device, num_rows: int) -> tuple[Tensor, Tensor]:
    # Shared by every plan of this many segments: the kernels leave it zeroed and run in stream
    # order, so one copy serves them all. With gradients reallocated each step (zero_grad's
    # default), each new address set is a new plan; per-plan histograms (16 KiB a segment) would
    # pile up to _CACHE_SIZE copies. Never freed, so a captured CUDA graph can keep pointing at it.
    key = (device, num_rows)
    if key not in _radix_scratch:
        _radix_scratch[key] = (
            torch.zeros(num_rows, d.RADIX_BINS.value, dtype=torch.int64, device=device),
            torch.zeros(num_rows, 2, dtype=torch.int64, device=device),
        )
    return _radix_scratch[key]


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def plan_for(params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, max_exp_avg_sqs: list,
             soft_masks: list, steps: list, selections: list, *, tile: int, segment: int | None,
             fraction: float, exact: bool) -> Plan:
    """The (cached) plan for a bucket, given as columns of tensors (None where a tensor has none).

    Each tensor is cut into segments of ``segment`` elements (None: the whole
    tensor), each segment into programs of ``tile`` elements (at least one,
    so that empty tensors still get their step). The one-pass kernel
    (``exact=False``) selects per tile; the exact path per segment. Selected
    counts come from :func:`selopt.reference.block_k`, on the host, so every
    backend agrees on them.
    """
    columns = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, soft_masks, steps, selections)
    device = params[0].device
    # Addresses a column at a time: the key is built on every step, and this is its cost.
    key = (exact, device, params[0].dtype, exp_avgs[0].dtype, tile, segment, fraction,
           tuple([p.numel() for p in params]),
           tuple([-1 if m is None else m.numel() for m in soft_masks]),
           *(tuple([0 if t is None else t.data_ptr() for t in column]) for column in columns))
    capturing = _capturing(device)
    plan = _plans.get(key) or _captured_plans.get(key)
    if plan is not None:
        if key in _plans:
            _plans.move_to_end(key)
        if capturing:
            _captured_plans[key] = plan
        return plan
    if capturing:
        # Building a plan copies its table from the host; a graph would replay that copy from a host
        # buffer that is gone by then. Torch's optimizers ask for the same warm-up before capture.
        raise RuntimeError(
            "selopt met tensors it has not stepped before while a CUDA graph is being captured: run "
            "optimizer.step() once on the same tensors (params, grads, state) before capturing"
        )

    rows, program_rows = [], []
    for index, (p, g, m, v, vmax, mask, step, selection) in enumerate(zip(*columns)):
        numel = p.numel()
        mask_div = 0 if mask is None else max(numel // max(mask.numel(), 1), 1)
        salt = (p.data_ptr() >> 4) & 0x7FFFFFFF
        length = numel if segment is None else segment
        for start in range(0, max(numel, 1), max(length, 1)):
            n = min(length, numel - start)
            row = [0] * d.NUM_COLUMNS.value
            for column, t in ((d.COL_PARAM, p), (d.COL_GRAD, g), (d.COL_EXP_AVG, m), (d.COL_EXP_AVG_SQ, v),
                              (d.COL_MAX_EXP_AVG_SQ, vmax), (d.COL_SELECTION, selection)):
                row[column.value] = 0 if t is None else t.data_ptr() + start * t.element_size()
            row[d.COL_SOFT_MASK.value] = _address(mask)
            row[d.COL_NUMEL.value] = n
            row[d.COL_K_FULL.value] = block_k(fraction, n if exact else tile)
            row[d.COL_K_TAIL.value] = block_k(fraction, n % tile or tile)
            row[d.COL_MASK_DIV.value] = mask_div
            row[d.COL_FIRST_PROGRAM.value] = len(program_rows)
            row[d.COL_OFFSET.value] = start
            row[d.COL_TENSOR.value] = index
            row[d.COL_SALT.value] = salt
            # At least one program per segment, so that an empty tensor still gets its row.
            program_rows += [len(rows)] * max(1, -(-n // tile))
            rows.append(row)

    streams = (d.COL_PARAM, d.COL_GRAD, d.COL_EXP_AVG, d.COL_EXP_AVG_SQ, d.COL_MAX_EXP_AVG_SQ)
    aligned = tile % 8 == 0 and all(
        row[d.COL_NUMEL.value] % 8 == 0 and all(row[c.value] % 16 == 0 for c in streams) for row in rows)
    num_rows, num_programs, num_tensors = len(rows), len(program_rows), len(params)
    # One host-to-device copy for the table, the program map and the step addresses.
    packed = _to_device([x for row in rows for x in row] + program_rows + [step.data_ptr() for step in steps], device)
    table_end = num_rows * d.NUM_COLUMNS.value
    histogram, select_state = _radix_scratch_for(device, num_rows) if exact else (None, None)
    plan = Plan(
        table=packed[:table_end].view(num_rows, d.NUM_COLUMNS.value),
        program_rows=packed[table_end:table_end + num_programs],
        steps=packed[table_end + num_programs:],
        step_scalars=torch.zeros(num_tensors, d.STEP_SCALARS.value, dtype=torch.float32, device=device),
        num_tensors=num_tensors,
        num_rows=num_rows,
        num_programs=num_programs,
        aligned=aligned,
        histogram=histogram,
        select_state=select_state,
    )
    _plans[key] = plan
    if len(_plans) > _CACHE_SIZE:
        _plans.popitem(last=False)
    return plan
