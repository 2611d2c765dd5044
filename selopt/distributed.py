"""Sharded parameters: selopt's step on FSDP2 / DTensor shards, with MoFO's selection exact across ranks.

FSDP2 (``torch.distributed.fsdp.fully_shard``) and tensor parallelism hand the
optimizer ``DTensor`` parameters: each rank holds a slice of every tensor, the
gradient is a ``DTensor`` with the same placements, and the moments are kept as
``DTensor``\\ s too (``torch.zeros_like(param)``, as ``torch.optim.AdamW`` keeps
them), so ``state_dict`` and ``torch.distributed.checkpoint`` see what they see
for torch's AdamW. Everything elementwise runs on the local shards
(``to_local()``), with the implementation a plain tensor on that device would
get (:func:`selopt.functional.choose_implementation`): the fused Triton
kernels on CUDA (:func:`prepare_adamw_on_kernels`), else the torch reference
(:func:`prepare_adamw`).

Only MoFO's per-tensor selection (``fraction < 1``, ``block_size=None``) needs
the whole tensor: its threshold is the k-th largest ``|m|`` over all shards,
``k = block_k(fraction, global numel)``. Both implementations find it with
the one radix select of :mod:`selopt.selection` (the kernels' launches, or the
same rounds in torch ops), with each round's histograms all-reduced (summed)
between counting and choosing the bin, so every rank picks the same bins and
then selects exactly what one process holding the whole tensor would: ties at
the threshold all selected, NaN never. The histograms of all tensors of a
bucket that share a mesh go into one all-reduce per round.

Bytes exchanged (the all-reduced payload per rank per step, counted in
:data:`traffic` and predicted by :func:`selection_bytes_per_step`): one count
per bin of every round, int32 while the tensor has fewer than 2**31 entries
(int64 beyond): ``(1024 + 2048 + 1024) * 4`` B = 16 KiB per exactly-selected
sharded tensor for fp32/bf16/fp16 params (16 B more on the kernels, whose
first round also sums the four counters of their candidate window), and
36 KiB for fp64 (six rounds), whatever the tensor's size (a ring all-reduce moves about twice the payload
per rank on the wire). That is twice the 8 KiB of the earlier torch-only
select (four rounds of 256 int64 bins): the rounds are the kernels' (10, 11
and 10 bits, which keep their register histograms small), and one algorithm
for every path is worth 8 KiB per matrix and step. Dense AdamW, block mode and
unsharded tensors exchange nothing.

Block mode (``block_size`` set) never communicates: blocks are contiguous runs
of the *local* shard's flattened elements. They coincide with the blocks one
process would cut from the whole tensor exactly when every rank's shard is a
contiguous run of the flattened tensor that starts at a multiple of
``block_size`` and every shard but the last non-empty one holds a multiple of
``block_size`` elements. For FSDP2's default ``Shard(0)`` over ``w`` ranks
that is: ``ceil(rows / w) * row_numel`` is a multiple of ``block_size`` (or
only one rank holds rows). Otherwise selection is still per block of at most
``block_size`` entries, just on a different partition.

Soft masks (:meth:`selopt.AdamW.set_soft_mask`) are given for the whole
parameter, per row ``(rows,)`` or full shape, on every rank; each rank takes
its slice locally, with no communication.

DDP needs nothing from here: its parameters are plain full tensors with
gradients already averaged, and every rank takes the same step.

Example (under ``torchrun --nproc-per-node 2``)::

    model = fully_shard(model)                      # params become DTensors
    opt = selopt.MoFO(model.parameters(), lr=1e-5, fraction=0.15)
    loss.backward(); opt.step()                     # same selection as one GPU
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from selopt import reference, selection
from selopt.options import AdamWOptions

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # torch built without distributed support
    DTensor = None


@dataclass
class Traffic:
    """Collective calls and bytes (payload per rank) this process spent on selection thresholds."""

    all_reduces: int = 0
    bytes: int = 0

    def reset(self) -> None:
        self.all_reduces = 0
        self.bytes = 0


traffic = Traffic()


def is_dtensor(tensor) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (FSDP2 and tensor-parallel parameters).

    >>> is_dtensor(torch.zeros(2))
    False
    """
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (sharing its storage), or the tensor itself.

    >>> local(torch.ones(2)).tolist()
    [1.0, 1.0]
    """
    return tensor.to_local() if is_dtensor(tensor) else tensor


def shard_groups(param: Tensor) -> tuple:
    """Process groups over which ``param`` is split: its mesh dims with a ``Shard`` placement.

    Replicated mesh dims (HSDP's replica dim) hold copies and are left out, so
    summing over the returned groups counts every entry of the tensor once.
    """
    if not is_dtensor(param):
        return ()
    mesh = param.device_mesh
    groups = []
    for mesh_dim, placement in enumerate(param.placements):
        if placement.is_partial():
            raise ValueError(f"params must not have Partial placements (pending reductions), got {param.placements}")
        if placement.is_shard() and mesh.size(mesh_dim) > 1:
            groups.append(mesh.get_group(mesh_dim))
    return tuple(groups)


def selection_bytes_per_step(optimizer: torch.optim.Optimizer) -> int:
    """Bytes this rank all-reduces per step for exact selection (the payload :data:`traffic` counts).

    Assumes every param gets a gradient in the step. Dense groups, block mode
    and unsharded params exchange nothing.

    >>> selection_bytes_per_step(torch.optim.SGD([torch.zeros(3, requires_grad=True)], lr=0.1))
    0
    """
    total = 0
    for group in optimizer.param_groups:
        if group.get("fraction", 1.0) >= 1.0 or group.get("block_size") is not None:
            continue
        for p in group["params"]:
            n_groups = len(shard_groups(p))
            if n_groups:
                key_dtype = torch.int64 if p.dtype == torch.float64 else torch.int32
                bins = sum(1 << bits for _, bits in selection.RADIX_ROUNDS[key_dtype]) + _window_counters(p, group)
                total += n_groups * bins * _count_dtype([p.numel()]).itemsize
    return total


def _window_counters(param: Tensor, group: dict) -> int:
    """The counters the kernels' exact path adds to its first round's histogram (its candidate window)."""
    # Imported here: both import this module.
    from selopt import functional
    from selopt.optim import moment_dtype

    options = AdamWOptions.from_group(group)
    implementation = functional.choose_implementation(
        param.device, param.dtype, moment_dtype(param.dtype, options.moment_dtype), sharded=True, options=options)
    if implementation is not functional.SHARDED_TRITON:
        return 0
    from selopt.kernels import exact

    return exact.FIRST_ROUND_COUNTERS - (1 << exact.FIRST_BITS)


def _count_dtype(numels: list[int]) -> torch.dtype:
    # Counts are exchanged as int32 while no tensor can reach 2**31 entries in one bin: half the bytes.
    return torch.int32 if max(numels) < 2**31 else torch.int64


def _all_reduce_counts(groups: tuple, count_dtype: torch.dtype):
    def combine(counts: Tensor) -> None:
        exchanged = counts.to(count_dtype)
        for group in groups:
            dist.all_reduce(exchanged, group=group)
            traffic.all_reduces += 1
            traffic.bytes += exchanged.numel() * exchanged.element_size()
        counts.copy_(exchanged)
    return combine


def local_soft_mask(mask: Tensor | None, param: Tensor) -> Tensor | None:
    """This rank's slice of a whole-parameter soft mask (per row or full shape), as a full local-shape mask."""
    if mask is None or not is_dtensor(param):
        return mask
    whole = reference.expand_soft_mask(mask, param).expand(param.shape)
    # src_data_rank=None: every rank already holds the whole mask and just keeps its slice, no collective.
    return distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None).to_local()


def _local_grad(grad: Tensor, param: Tensor) -> Tensor:
    if is_dtensor(grad) and tuple(grad.placements) != tuple(param.placements):
        grad = grad.redistribute(param.device_mesh, param.placements)
    return local(grad)


class _Local:
    """A bucket's lists on this rank's local shards: what an implementation for plain tensors takes."""

    def __init__(self, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, soft_masks):
        count = len(params)
        self.params = [local(p) for p in params]
        self.grads = [_local_grad(g, p) for g, p in zip(grads, params)]
        self.exp_avgs = [local(m) for m in exp_avgs]
        self.exp_avg_sqs = [local(v) for v in exp_avg_sqs]
        self.max_exp_avg_sqs = None if max_exp_avg_sqs is None else [local(v) for v in max_exp_avg_sqs]
        self.soft_masks = [local_soft_mask(m, p) for m, p in zip(soft_masks or [None] * count, params)]


def _by_mesh(params) -> dict[tuple, list[int]]:
    """Indices of ``params`` grouped by the process groups they are split over, and dtype."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((shard_groups(p), p.dtype), []).append(i)
    return groups


def _exact(options: AdamWOptions) -> bool:
    return not options.dense and options.block_size is None


def prepare_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, options: AdamWOptions,
                  soft_masks=None, rounding_seeds=None, grad_scale=None, found_inf=None, selections=None,
                  cache=None):
    """The sharded reference implementation of :func:`selopt.functional.adamw`: DTensor params, local shards.

    Same signature as every implementation (``cache`` is unused); moments are
    DTensors too, soft masks whole-parameter masks, ``selections`` local-shard
    buffers. Exact per-tensor selection agrees on each tensor's threshold
    across its shards first (one all-reduce per radix round and mesh). Every
    rank of the mesh must step the same param groups.
    """
    count = len(params)
    shards = _Local(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, soft_masks)
    if not _exact(options):
        return reference.prepare_adamw(shards.params, shards.grads, shards.exp_avgs, shards.exp_avg_sqs,
                                       shards.max_exp_avg_sqs, state_steps, options=options,
                                       soft_masks=shards.soft_masks, rounding_seeds=rounding_seeds,
                                       grad_scale=grad_scale, found_inf=found_inf, selections=selections)
    states = reference.bucket_states(shards.exp_avgs, shards.exp_avg_sqs, shards.max_exp_avg_sqs, state_steps,
                                     rounding_seeds)
    selections = selections or [None] * count

    def step() -> None:
        # Steps 1-2 on every tensor, stored (as the kernels do), keeping only the keys of |m|.
        keys = []
        for i, p in enumerate(shards.params):
            moments = reference.adam_moments(p, shards.grads[i], states[i]["exp_avg"], states[i]["exp_avg_sq"],
                                             states[i]["max_exp_avg_sq"], options=options,
                                             soft_mask=shards.soft_masks[i], grad_scale=grad_scale)
            keys.append(selection.magnitude_keys(moments.exp_avg))
            reference.store_moments_(states[i], moments, found_inf)
        thresholds = [None] * count
        for (groups, _), indices in _by_mesh(params).items():  # one dtype: keys of one width
            numels = [params[i].numel() for i in indices]  # a DTensor's numel is the whole tensor's
            found = selection.radix_thresholds(
                [keys[i] for i in indices], [selection.block_k(options.fraction, n) for n in numels],
                _all_reduce_counts(groups, _count_dtype(numels)))
            for i, threshold in zip(indices, found):
                thresholds[i] = threshold
        for i, p in enumerate(shards.params):
            selected = (keys[i] >= thresholds[i]).view(p.shape)
            reference.update_param_(p, states[i], selected, options=options, soft_mask=shards.soft_masks[i],
                                    found_inf=found_inf)
            if selections[i] is not None:
                selections[i].copy_(selected)
    return step


def prepare_adamw_on_kernels(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *,
                             options: AdamWOptions, soft_masks=None, rounding_seeds=None, grad_scale=None,
                             found_inf=None, selections=None, cache=None):
    """The sharded Triton implementation of :func:`selopt.functional.adamw`: the kernels on local shards.

    The signature and the conventions of :func:`prepare_adamw`; ``cache`` is
    the kernels' :class:`~selopt.kernels.PlanCache`. Exact per-tensor selection
    runs the kernels' own radix rounds with each round's histograms all-reduced
    between counting and choosing, one collective per round and mesh.
    """
    from selopt.kernels import adamw as kernels

    shards = _Local(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, soft_masks)
    common = dict(options=options, grad_scale=grad_scale, found_inf=found_inf, cache=cache)
    if not _exact(options):
        return kernels.prepare_adamw(shards.params, shards.grads, shards.exp_avgs, shards.exp_avg_sqs,
                                     shards.max_exp_avg_sqs, state_steps, soft_masks=shards.soft_masks,
                                     rounding_seeds=rounding_seeds, selections=selections, **common)

    def pick(column, indices):
        return None if column is None else [column[i] for i in indices]

    prepared = []
    for (groups, _), indices in _by_mesh(params).items():
        numels = [params[i].numel() for i in indices]  # a DTensor's numel is the whole tensor's
        prepared.append(kernels.prepare_adamw(
            pick(shards.params, indices), pick(shards.grads, indices), pick(shards.exp_avgs, indices),
            pick(shards.exp_avg_sqs, indices), pick(shards.max_exp_avg_sqs, indices), pick(state_steps, indices),
            soft_masks=pick(shards.soft_masks, indices), rounding_seeds=pick(rounding_seeds, indices),
            selections=pick(selections, indices), whole_numels=numels,
            combine=_all_reduce_counts(groups, _count_dtype(numels)), **common))

    def step() -> None:
        for run in prepared:
            run()
    return step
