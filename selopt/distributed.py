"""Sharded parameters: selopt's step on FSDP2 / DTensor shards, with MoFO's selection exact across ranks.

FSDP2 (``torch.distributed.fsdp.fully_shard``) and tensor parallelism hand the
optimizer ``DTensor`` parameters: each rank holds a slice of every tensor, the
gradient is a ``DTensor`` with the same placements, and the moments are kept as
``DTensor``\\ s too (``torch.zeros_like(param)``, as ``torch.optim.AdamW`` keeps
them), so ``state_dict`` and ``torch.distributed.checkpoint`` see what they see
for torch's AdamW. Everything elementwise runs on the local shards
(``to_local()``) through :func:`selopt.reference.adamw_step_`.

Only MoFO's per-tensor selection (``fraction < 1``, ``block_size=None``) needs
the whole tensor: its threshold is the k-th largest ``|m|`` over all shards,
``k = block_k(fraction, global numel)``. :func:`global_thresholds` finds it by
a radix select on the integer bits of ``|m|`` (non-negative floats order like
their bit patterns): per round, every rank counts its candidates into a
256-bin histogram of the next 8 bits, the histograms are all-reduced (summed),
and every rank picks the same bin. Four rounds for fp32 moments (eight for
fp64) pin the exact bits of the threshold, so each rank then selects exactly
what one process holding the whole tensor would: ties at the threshold all
selected, NaN never. The histograms of all tensors of a param group that share
a mesh go into one all-reduce per round.

Bytes exchanged (the all-reduced payload per rank per step, counted in
:data:`traffic` and predicted by :func:`selection_bytes_per_step`):
``rounds * 256 * 8`` B per exactly-selected sharded tensor, i.e. 8 KiB for
fp32/bf16/fp16 params and 16 KiB for fp64, whatever the tensor's size (a ring
all-reduce moves about twice the payload per rank on the wire). Dense AdamW,
block mode and unsharded tensors exchange nothing.

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

The Triton kernels work on plain tensors, so DTensor parameters use this torch
path with ``backend="auto"`` or ``"torch"``; ``backend="triton"`` refuses them.
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

from selopt import reference

RADIX_BITS = 8
BINS = 1 << RADIX_BITS
COUNT_DTYPE = torch.int64  # global counts can pass 2**31 for the largest embeddings

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


def sharded_backend(requested: str) -> str:
    """The backend a DTensor parameter gets: always the torch path on local shards."""
    if requested == "triton":
        raise ValueError(
            "backend='triton' takes plain tensors only, and this param group holds DTensor (FSDP2 / tensor-parallel) "
            "params: use backend='auto' or 'torch', which step their local shards"
        )
    return "sharded"


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
                rounds = 8 * reference.compute_dtype(p.dtype).itemsize // RADIX_BITS
                total += n_groups * rounds * BINS * COUNT_DTYPE.itemsize
    return total


def magnitude_bits(m: Tensor) -> Tensor:
    """``|m|`` flattened as integers (int32 for fp32, int64 for fp64) that order like the values.

    NaN becomes a negative integer, below every number.

    >>> magnitude_bits(torch.tensor([2.0, -1.0])).tolist()
    [1073741824, 1065353216]
    """
    int_dtype = torch.int64 if m.dtype == torch.float64 else torch.int32
    # -1.0 has the sign bit set: negative as an integer, so NaN falls out of every histogram.
    return m.abs().masked_fill(m.isnan(), -1.0).reshape(-1).view(int_dtype)


def _histogram(bits: Tensor, shift: int, prefix: Tensor) -> Tensor:
    """Counts of the 8-bit digit at ``shift`` among entries whose higher bits equal ``prefix``'s."""
    high = shift + RADIX_BITS
    if high >= 8 * bits.element_size():
        candidates = bits >= 0
    else:
        candidates = (bits >> high) == (prefix >> high)
    # Non-candidates go to an overflow bin that is dropped: a scatter-add with
    # no boolean indexing, so no host sync on CUDA.
    index = torch.where(candidates, (bits >> shift) & (BINS - 1), BINS).long()
    counts = torch.zeros(BINS + 1, dtype=COUNT_DTYPE, device=bits.device)
    counts.index_add_(0, index, torch.ones(1, dtype=COUNT_DTYPE, device=bits.device).expand(index.numel()))
    return counts[:BINS]


def _all_reduce(counts: Tensor, groups: tuple) -> None:
    for group in groups:
        dist.all_reduce(counts, group=group)
        traffic.all_reduces += 1
        traffic.bytes += counts.numel() * counts.element_size()


def global_thresholds(bits: list[Tensor], ks: list[int], groups: tuple) -> list[Tensor]:
    """The k-th largest ``|m|`` of each sharded tensor, over all its shards: one 0-d tensor each.

    ``bits[i]`` is :func:`magnitude_bits` of this rank's shard of tensor ``i``
    (all int32 or all int64, on one device), and the thresholds come back as
    fp32 or fp64; ``ks[i]`` is counted over the whole tensor; ``groups`` are
    the process groups the tensors are split over (:func:`shard_groups`). Every
    rank must call this with the same tensors in the same order. NaN ranks
    below every number; when fewer than ``k`` entries are numbers the threshold
    is -1, which selects all of them, as :func:`selopt.reference.selection_mask`
    does. Runs on the device with no host sync.

    >>> m = torch.tensor([0.5, -3.0, float("nan"), 2.0])
    >>> global_thresholds([magnitude_bits(m)], [2], ())[0].item()
    2.0
    """
    if not bits:
        return []
    device = bits[0].device
    dtype = torch.float64 if bits[0].dtype == torch.int64 else torch.float32
    width = 8 * bits[0].element_size()
    prefix = torch.zeros(len(bits), dtype=bits[0].dtype, device=device)
    remaining = torch.tensor(ks, dtype=COUNT_DTYPE, device=device)
    too_few = None
    for shift in range(width - RADIX_BITS, -1, -RADIX_BITS):
        counts = torch.stack([_histogram(b, shift, prefix[i]) for i, b in enumerate(bits)])
        _all_reduce(counts, groups)
        at_or_above = counts.flip(-1).cumsum(-1).flip(-1)
        if too_few is None:
            too_few = at_or_above[:, 0] < remaining
        # at_or_above falls with the digit: the k-th largest sits in the highest bin still holding `remaining`.
        digit = ((at_or_above >= remaining[:, None]).sum(-1, keepdim=True) - 1).clamp_(min=0)
        remaining = remaining - (at_or_above.gather(1, digit) - counts.gather(1, digit)).squeeze(1)
        prefix = prefix | (digit.squeeze(1).to(prefix.dtype) << shift)
    thresholds = torch.where(too_few, torch.tensor(-1.0, dtype=dtype, device=device), prefix.view(dtype))
    return list(thresholds.unbind())


def local_soft_mask(mask: Tensor | None, param: Tensor) -> Tensor | None:
    """This rank's slice of a whole-parameter soft mask (per row or full shape), as a full local-shape mask."""
    if mask is None or not is_dtensor(param):
        return mask
    whole = reference.expand_soft_mask(mask, param).expand(param.shape)
    # src_data_rank=None: every rank already holds the whole mask and just keeps its slice, no collective.
    return distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None).to_local()


def sharded_step_(
    group: dict,
    params: list[Tensor],
    states: list[dict],
    soft_masks: list[Tensor | None],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> list[Tensor]:
    """One selopt step for a param group's DTensor ``params``, in place on their local shards.

    ``states`` hold torch's keys with DTensor moments; ``soft_masks`` are whole-
    parameter masks or None. Exact per-tensor selection first agrees on each
    tensor's threshold with :func:`global_thresholds`; that holds one fp32
    (fp64) copy of the group's local ``|m|`` bits at a time. Every rank of the
    mesh must step the same param groups. Returns each param's selection on
    its local shard.
    """
    options = reference.group_options(group)
    grads = []
    for p in params:
        grad = p.grad
        if is_dtensor(grad) and tuple(grad.placements) != tuple(p.placements):
            grad = grad.redistribute(p.device_mesh, p.placements)
        grads.append(local(grad))
    masks = [local_soft_mask(mask, p) for mask, p in zip(soft_masks, params)]
    local_states = [{key: local(value) for key, value in state.items()} for state in states]

    thresholds: list[Tensor | None] = [None] * len(params)
    if group["fraction"] < 1.0 and group["block_size"] is None:
        buckets: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            groups = shard_groups(p)
            if groups:
                key = (groups, reference.compute_dtype(p.dtype), local(p).device)
                buckets.setdefault(key, []).append(i)
        for (groups, _, _), indices in buckets.items():
            bits = []
            for i in indices:
                p_local = local(params[i])
                g = reference.effective_grad(p_local, grads[i], maximize=group["maximize"], soft_mask=masks[i],
                                             soft_mask_mode=group["soft_mask_mode"], grad_scale=grad_scale)
                # The same lerp as reference.adamw_math, so the threshold is taken on the very m it selects on.
                bits.append(magnitude_bits(local_states[i]["exp_avg"].to(g.dtype).lerp(g, 1 - options["beta1"])))
            ks = [reference.block_k(group["fraction"], params[i].numel()) for i in indices]
            for i, threshold in zip(indices, global_thresholds(bits, ks, groups)):
                thresholds[i] = threshold

    return [
        reference.adamw_step_(
            local(p), grad, state, found_inf=found_inf, stochastic_rounding=group["stochastic_rounding"],
            soft_mask=mask, threshold=threshold, grad_scale=grad_scale, **options,
        )
        for p, grad, state, mask, threshold in zip(params, grads, local_states, masks, thresholds)
    ]
