"""MoFO's selection rule and its one key encoding (``docs/design.md`` §2, step 3 of the step).

In a block of ``n`` entries the ``k = block_k(fraction, n)`` largest ``|m|``
move, ties at the threshold included. Every implementation (the reference
below, the kernels' in-register bisection and their radix select, the sharded
threshold search) works on the same integer *keys*:

- the key of ``|m|`` is its bit pattern as a signed integer (int32 for fp32,
  int64 for fp64): non-negative floats order like their bit patterns, so
  ``|m|`` compares exactly as its key does, and inf ranks above every finite
  value;
- NaN gets :data:`NAN_KEY`, the largest key, above inf: a non-finite moment
  is selected and reaches the parameter, as ``torch.topk`` ranks NaN in the
  official MoFO code, so a bad gradient shows as it does with torch's AdamW
  instead of freezing its entry forever;
- the threshold is the ``k``-th largest key, raised to :data:`MIN_THRESHOLD`
  (the key of the smallest non-zero ``|m|``): an entry whose ``|m|`` is 0 is
  never selected, since it would not move and selecting it would only decay
  it under ``decay="selected"``;
- an entry is selected when its key is at or above the threshold.

The radix select finds the threshold in :data:`RADIX_ROUNDS`, most
significant bits first: per round a histogram of the next bits among the
keys that share the prefix found so far, then the bin that holds the k-th
largest. :func:`radix_thresholds` runs those rounds in torch ops, with a hook
between the histogram and the bin choice where sharded tensors sum their
shards' histograms; the kernels run the same rounds on the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

# NaN's key: above every number's (inf's included), whatever NaN's sign and payload bits are.
NAN_KEY = {torch.int32: 2**31 - 1, torch.int64: 2**63 - 1}
# The lowest threshold: the key of the smallest non-zero |m|, so that |m| == 0 is never selected.
MIN_THRESHOLD = 1
# (lowest bit, number of bits) of each round, most significant first, by key width: together every
# value bit of the key (31 of int32, 63 of int64). At most 11 bits a round: 2048 bins.
RADIX_ROUNDS = {
    torch.int32: ((21, 10), (10, 11), (0, 10)),
    torch.int64: ((53, 10), (42, 11), (31, 11), (20, 11), (10, 10), (0, 10)),
}
RADIX_BINS = 1 << max(bits for rounds in RADIX_ROUNDS.values() for _, bits in rounds)
COUNT_DTYPE = torch.int64  # counts over a whole tensor can pass 2**31 for the largest embeddings


def block_k(fraction: float, n: int) -> int:
    """Entries selected in a block of ``n``: ``max(1, floor(fraction * n))``.

    Computed on the host in Python floats, once, so that every implementation
    selects the same count (the official MoFO code crashes when ``floor`` gives 0).

    >>> block_k(0.15, 100), block_k(0.15, 3)
    (15, 1)
    """
    return max(1, math.floor(fraction * n))


def magnitude_keys(m: Tensor) -> Tensor:
    """The keys of ``|m|``, flattened: int64 for fp64 ``m``, else int32 (of ``m`` in fp32).

    >>> magnitude_keys(torch.tensor([2.0, -1.0, 0.0, float("nan")])).tolist()
    [1073741824, 1065353216, 0, 2147483647]
    """
    flat = m.detach().reshape(-1)
    if flat.dtype != torch.float64:
        flat = flat.float()
    key_dtype = torch.int64 if flat.dtype == torch.float64 else torch.int32
    keys = flat.abs().view(key_dtype)
    return keys.masked_fill(flat.isnan(), NAN_KEY[key_dtype])


def threshold_of(kth_largest_key: Tensor) -> Tensor:
    """The threshold from the k-th largest key of a block: never below :data:`MIN_THRESHOLD`."""
    return kth_largest_key.clamp(min=MIN_THRESHOLD)


def selection_mask(exp_avg: Tensor, fraction: float, block_size: int | None = None) -> Tensor:
    """The selection of ``exp_avg`` (shaped like it): per block, the keys at or above the threshold.

    Blocks are contiguous runs of ``block_size`` entries of the flattened
    tensor (the last may be shorter), or the whole tensor when ``block_size``
    is None. ``fraction == 1`` selects everything, zeros included, as dense AdamW.

    >>> m = torch.tensor([0.1, -3.0, 2.0, 0.5])
    >>> selection_mask(m, 0.5).tolist()
    [False, True, True, False]
    """
    if fraction >= 1.0:
        return torch.ones_like(exp_avg, dtype=torch.bool)
    keys = magnitude_keys(exp_avg)
    n = keys.numel()
    block = n if block_size is None else block_size
    n_full = (n // block) * block if block else 0
    thresholds = []
    if n_full:
        kth = keys[:n_full].view(-1, block).topk(block_k(fraction, block), dim=1).values[:, -1:]
        thresholds.append(threshold_of(kth).expand(-1, block).reshape(-1))
    if n_full < n:
        tail = keys[n_full:]
        kth = tail.topk(block_k(fraction, tail.numel())).values[-1]
        thresholds.append(threshold_of(kth).expand(tail.numel()))
    threshold = torch.cat(thresholds) if thresholds else keys
    return (keys >= threshold).view_as(exp_avg)


def radix_histogram(keys: Tensor, prefix: Tensor, shift: int, bits: int) -> Tensor:
    """Counts of the ``bits``-bit digit at ``shift`` among the keys whose higher bits are ``prefix``.

    ``prefix`` (0-d) holds the bits found so far, aligned at ``shift + bits``.
    A scatter-add without boolean indexing: no host sync on CUDA.
    """
    bins = 1 << bits
    candidate = (keys >> (shift + bits)) == prefix
    index = torch.where(candidate, (keys >> shift) & (bins - 1), bins).long()  # bin `bins` is dropped
    counts = torch.zeros(bins + 1, dtype=COUNT_DTYPE, device=keys.device)
    counts.index_add_(0, index, torch.ones(1, dtype=COUNT_DTYPE, device=keys.device).expand(index.numel()))
    return counts[:bins]


def boundary_bins(counts: Tensor, rank: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of ``counts``: the highest bin with at least ``rank`` keys at or above it, and the rank left in it.

    With fewer than ``rank`` keys no bin qualifies and bin 0 is taken, round
    after round: the threshold comes out 0 (:func:`threshold_of` raises it).
    """
    at_or_above = counts.flip(-1).cumsum(-1).flip(-1)
    boundary = ((at_or_above >= rank[:, None]).sum(-1, keepdim=True) - 1).clamp_(min=0)
    above = at_or_above.gather(1, boundary) - counts.gather(1, boundary)
    return boundary.squeeze(1), rank - above.squeeze(1)


def radix_thresholds(keys: list[Tensor], ks: list[int],
                     combine: Callable[[Tensor], None] = lambda counts: None) -> list[Tensor]:
    """The threshold (a 0-d key, :func:`threshold_of`) of each key tensor, by the rounds of :data:`RADIX_ROUNDS`.

    ``keys`` are :func:`magnitude_keys` of one width on one device; ``ks[i]``
    is the rank to find in ``keys[i]``. ``combine`` sees each round's stacked
    histograms before the bins are chosen and may change them in place: a
    sharded tensor sums there the histograms of its shards, so every shard
    finds the threshold of the whole tensor. Runs on the device, no host sync.

    >>> keys = magnitude_keys(torch.tensor([0.5, -3.0, float("nan"), 2.0]))
    >>> [t.view(torch.float32).item() for t in radix_thresholds([keys], [3])]
    [2.0]
    """
    if not keys:
        return []
    device, dtype = keys[0].device, keys[0].dtype
    prefix = torch.zeros(len(keys), dtype=dtype, device=device)
    rank = torch.tensor(ks, dtype=COUNT_DTYPE, device=device)
    for shift, bits in RADIX_ROUNDS[dtype]:
        counts = torch.stack([radix_histogram(k, prefix[i], shift, bits) for i, k in enumerate(keys)])
        combine(counts)
        boundary, rank = boundary_bins(counts, rank)
        prefix = (prefix << bits) | boundary.to(dtype)
    return list(threshold_of(prefix).unbind())
