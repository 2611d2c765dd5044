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
the threshold all selected, NaN above every number, zero never. The histograms of all tensors of a
bucket that share a mesh go into one all-reduce per round.

Bytes exchanged (the all-reduced payload per rank per step, counted by a
:class:`Traffic` and predicted by :func:`selopt.functional.selection_bytes_per_step`):
one count per bin of every radix round (plus the kernels' own counters, which
ride the first round), int32 while the tensor has fewer than 2**31 entries
(int64 beyond), per exactly-selected sharded tensor, whatever its size: the
rounds are the kernels', and one algorithm for every path is worth a few KiB
per matrix and step (figures in bench/NOTES.md). Dense AdamW, block mode and
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

import contextvars
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from selopt import reference, selection
from selopt.bucket import Bucket
from selopt.options import AdamWOptions

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # torch built without distributed support
    DTensor = None


@dataclass
class Traffic:
    """Collective calls and bytes (payload per rank) spent on selection thresholds while counting.

    Counting is opt-in and scoped: ``with Traffic() as traffic: opt.step()``
    counts the all-reduces of the steps inside the block (a context variable,
    so threads and other optimizers outside it are not counted).

    >>> with Traffic() as traffic:
    ...     pass
    >>> traffic.all_reduces, traffic.bytes
    (0, 0)
    """

    all_reduces: int = 0
    bytes: int = 0

    def __enter__(self) -> Traffic:
        self._token = _counting.set((*_counting.get(), self))
        return self

    def __exit__(self, *exc) -> None:
        _counting.reset(self._token)


_counting: contextvars.ContextVar[tuple[Traffic, ...]] = contextvars.ContextVar("selopt_traffic", default=())


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


def exchanged_bytes(param: Tensor, counts_per_step: int) -> int:
    """Bytes one rank all-reduces per step to select ``param`` exactly, exchanging ``counts_per_step`` counts."""
    return len(shard_groups(param)) * counts_per_step * _count_dtype([param.numel()]).itemsize


def _count_dtype(numels: list[int]) -> torch.dtype:
    # Counts are exchanged as int32 while no tensor can reach 2**31 entries in one bin: half the bytes.
    return torch.int32 if max(numels) < 2**31 else torch.int64


def _all_reduce_counts(groups: tuple, count_dtype: torch.dtype):
    def combine(counts: Tensor) -> None:
        exchanged = counts.to(count_dtype)
        for group in groups:
            dist.all_reduce(exchanged, group=group)
            for traffic in _counting.get():
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


def local_bucket(bucket: Bucket) -> Bucket:
    """``bucket`` on this rank's local shards: what an implementation for plain tensors takes.

    Whole-parameter soft masks become the local shard's slice; selections are local already.
    """
    params = bucket.params
    masks = bucket.soft_masks
    states = {name: None if values is None else [local(t) for t in values] for name, values in bucket.fields()
              if name in _SHARDED_STATE}
    return bucket.replace(
        params=[local(p) for p in params],
        grads=[_local_grad(g, p) for g, p in zip(bucket.grads, params)],
        soft_masks=None if masks is None else [local_soft_mask(m, p) for m, p in zip(masks, params)],
        **states,
    )


# Bucket fields that are DTensors sharded as their params (8-bit scales by rows, as the rows).
_SHARDED_STATE = ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "exp_avg_scales", "exp_avg_sq_scales")


def _by_mesh(params) -> dict[tuple, list[int]]:
    """Indices of ``params`` grouped by the process groups they are split over, and dtype."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((shard_groups(p), p.dtype), []).append(i)
    return groups


def prepare_adamw(bucket: Bucket, options: AdamWOptions, *, grad_scale=None, found_inf=None, cache=None):
    """The sharded reference implementation: DTensor params, the reference on their local shards.

    The signature of every implementation (:mod:`selopt.bucket`; ``cache`` is
    unused); moments are DTensors too, soft masks whole-parameter masks,
    selections local-shard buffers. Exact per-tensor selection agrees on each
    tensor's threshold across its shards first (one all-reduce per radix round
    and mesh). Every rank of the mesh must step the same param groups.
    """
    shards = local_bucket(bucket)
    if options.path != "exact":
        return reference.prepare_adamw(shards, options, grad_scale=grad_scale, found_inf=found_inf)

    per_tensor = [shards.tensors(i) for i in range(len(shards))]
    states = [reference.tensor_state(tensors) for tensors in per_tensor]

    def step() -> None:
        # Steps 1-2 on every tensor, stored (as the kernels do), keeping only the keys of |m|.
        keys = []
        for p, tensors, state in zip(shards.params, per_tensor, states):
            moments = reference.adam_moments(p, tensors["grads"], *reference.stored_moments(state), options=options,
                                             soft_mask=tensors["soft_masks"], grad_scale=grad_scale)
            keys.append(selection.magnitude_keys(moments.exp_avg))
            reference.store_moments_(state, moments, found_inf)
        thresholds = _thresholds(bucket.params, keys, options)
        for p, tensors, state, key, threshold in zip(shards.params, per_tensor, states, keys, thresholds):
            selected = (key >= threshold).view(p.shape)
            reference.update_param_(p, state, selected, options=options, soft_mask=tensors["soft_masks"],
                                    found_inf=found_inf)
            if tensors["selections"] is not None:
                tensors["selections"].copy_(selected)
    return step


def _thresholds(params: list, keys: list[Tensor], options: AdamWOptions) -> list[Tensor]:
    """Each sharded tensor's threshold over all its shards: one radix select per mesh, histograms all-reduced."""
    thresholds = [None] * len(params)
    for (groups, _), indices in _by_mesh(params).items():  # one dtype: keys of one width
        numels = [params[i].numel() for i in indices]  # a DTensor's numel is the whole tensor's
        found = selection.radix_thresholds(
            [keys[i] for i in indices], [selection.block_k(options.fraction, n) for n in numels],
            _all_reduce_counts(groups, _count_dtype(numels)))
        for i, threshold in zip(indices, found):
            thresholds[i] = threshold
    return thresholds


def prepare_adamw_on_kernels(bucket: Bucket, options: AdamWOptions, *, grad_scale=None, found_inf=None,
                             cache=None):
    """The sharded Triton implementation: the kernels on local shards.

    The conventions of :func:`prepare_adamw`; ``cache`` is the kernels'
    :class:`~selopt.kernels.PlanCache`. Exact per-tensor selection runs the
    kernels' own radix rounds with each round's histograms all-reduced between
    counting and choosing, one collective per round and mesh.
    """
    from selopt.kernels import adamw as kernels  # Triton is optional: imported only when the kernels run

    shards = local_bucket(bucket)
    common = dict(grad_scale=grad_scale, found_inf=found_inf, cache=cache)
    if options.path != "exact":
        return kernels.prepare_adamw(shards, options, **common)
    prepared = []
    for (groups, _), indices in _by_mesh(bucket.params).items():
        numels = [bucket.params[i].numel() for i in indices]  # a DTensor's numel is the whole tensor's
        prepared.append(kernels.prepare_adamw(shards.select(indices), options, whole_numels=numels,
                                              combine=_all_reduce_counts(groups, _count_dtype(numels)), **common))

    def step() -> None:
        for run in prepared:
            run()
    return step
