"""Complex parameters step as their real views (``torch.view_as_real``), as in ``torch.optim.AdamW``.

For the length of a step, each complex param is replaced by its real view,
with the real views of its grad and moments as its state (the step count is
shared) and its soft mask, so every implementation updates the complex
tensors in place without knowing about them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from selopt.state import STEP


@contextlib.contextmanager
def as_real(params: list[Tensor], state: dict, soft_masks: dict[Tensor, Tensor]) -> Iterator[list[Tensor]]:
    """``params`` with every complex tensor replaced by its real view, ``state`` and ``soft_masks`` extended.

    Nothing is left behind on exit but a step count moved to another device,
    which the param keeps.

    >>> p = torch.zeros(2, dtype=torch.complex64)
    >>> p.grad = torch.ones(2, dtype=torch.complex64)
    >>> state = {p: {"step": torch.tensor(0.0)}}
    >>> with as_real([p], state, {}) as stepped:
    ...     stepped[0].shape, stepped[0].grad.shape
    (torch.Size([2, 2]), torch.Size([2, 2]))
    """
    stepped, views = [], []
    for p in params:
        if p.is_complex():
            view = torch.view_as_real(p)
            view.grad = torch.view_as_real(p.grad)
            state[view] = {key: torch.view_as_real(value) if isinstance(value, Tensor) and value.is_complex() else value
                           for key, value in state[p].items()}
            if p in soft_masks:
                soft_masks[view] = soft_masks[p]  # stored at the real view's shape (soft_masks.checked_soft_mask)
            views.append((p, view))
            p = view
        stepped.append(p)
    try:
        yield stepped
    finally:
        for p, view in views:
            state[p][STEP] = state.pop(view)[STEP]  # the implementation may have moved it
            soft_masks.pop(view, None)
