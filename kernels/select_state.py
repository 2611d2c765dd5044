"""The exact path's state between steps (:mod:`selopt.kernels.exact`): per row, the select state and
the candidate list of its window (docs/design.md §3), and the scratch that holds them.

Kernels read these constants as ``select_state.NAME``: Triton checks every global a kernel uses at each
launch, and one module is one global.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
import triton.language as tl
from torch import Tensor

from selopt.kernels import device as d

# The per-row select state (int64), kept from one step to the next.
STATE_PREFIX = tl.constexpr(0)  # the key bits found so far, relative to STATE_BASE
STATE_RANK = tl.constexpr(1)  # the rank still to find among the keys that share the prefix
STATE_BASE = tl.constexpr(2)  # what the refinement rounds subtract from a key: 0, or the window's low end
STATE_FROM_LIST = tl.constexpr(3)  # 1: the refinement rounds read the candidate list instead of m
STATE_THRESHOLD = tl.constexpr(4)  # the last threshold found: this step's selection, the next step's hint
STATE_WINDOW_BITS = tl.constexpr(5)  # log2 of the window's width in key units; 0: no window yet
STATE_LIST_COUNT = tl.constexpr(6)  # keys appended to the candidate list this step (may pass its capacity)
# The address of the row's int32 candidate list, written with the scratch. (Here rather than in the
# launch table: a table column more costs the one-pass kernels registers; bench/NOTES.md.)
STATE_CANDIDATES = tl.constexpr(7)
STATE_COLUMNS = tl.constexpr(8)
# A row's candidate list holds up to 1/CANDIDATE_SHARE of its entries (rounded up).
CANDIDATE_SHARE = tl.constexpr(16)


class RadixScratch(NamedTuple):
    """The exact path's scratch for one param set: histograms, select state, candidate lists."""

    histogram: Tensor  # int64 [rows, d.RADIX_BINS], zero between launches
    select_state: Tensor  # int64 [rows, STATE_COLUMNS], kept between steps
    candidates: Tensor  # int32: the rows' candidate lists, which the select state addresses


def candidate_capacity(row_numel: int) -> int:
    """Keys a row's candidate list holds: 1/``CANDIDATE_SHARE`` of its entries, rounded up, as the kernels count."""
    return -(-row_numel // CANDIDATE_SHARE.value)


def new_radix_scratch(device: torch.device, row_numels: list[int], to_device: Callable) -> RadixScratch:
    """Zeroed scratch for rows of ``row_numels``; ``to_device`` copies a host list of int64 to ``device``."""
    capacities = [candidate_capacity(n) for n in row_numels]
    candidates = torch.empty(sum(capacities), dtype=torch.int32, device=device)
    # Each row's list address goes into its select state, which the kernels never overwrite there.
    state = torch.zeros(len(row_numels), STATE_COLUMNS.value, dtype=torch.int64)
    state[:, STATE_CANDIDATES.value] = candidates.data_ptr() + candidates.element_size() * (
        torch.tensor([0] + capacities[:-1], dtype=torch.int64).cumsum(0))
    return RadixScratch(torch.zeros(len(row_numels), d.RADIX_BINS.value, dtype=torch.int64, device=device),
                        to_device(state.view(-1).tolist(), device).view(state.shape), candidates)
