"""Soft masks (CoFiTune's update scales): checked when set, kept as the step reads them, saved with the state.

A mask has shape ``(rows,)`` (one factor per output row) or the param's
shape, values in [0, 1]. The optimizer keeps it as the step reads it (fp32,
contiguous; for a complex param's full-shape mask, at its real view's
shape) and saves it as the param's ``"soft_mask"`` state entry.
"""

from __future__ import annotations

import torch
from torch import Tensor

SOFT_MASK = "soft_mask"  # the state-dict entry of a param's mask


class SoftMasks:
    """The soft-mask methods of :class:`selopt.AdamW`, on a ``torch.optim.Optimizer`` that keeps
    ``_soft_masks`` (param -> the mask as the step reads it)."""

    def set_soft_mask(self, param: Tensor, mask: Tensor | None) -> None:
        """Scale ``param``'s updates (or gradients) by ``mask`` in [0, 1]; None removes it.

        ``mask`` has shape ``(param.shape[0],)`` (one factor per output row, as
        CoFiTune's unit masks) or ``param.shape``. The group's ``soft_mask_mode``
        chooses whether it scales the update or the gradient. Masks are saved
        by :meth:`state_dict` (as the per-parameter state entry ``"soft_mask"``)
        and restored by :meth:`load_state_dict`; ``copy.deepcopy`` and
        ``pickle`` keep them too.

        >>> layer = torch.nn.Linear(3, 2)
        >>> opt = selopt.AdamW(layer.parameters())
        >>> opt.set_soft_mask(layer.weight, torch.tensor([1.0, 0.25]))
        >>> opt.state_dict()["state"][0]["soft_mask"]
        tensor([1.0000, 0.2500])
        """
        if not any(param is p for group in self.param_groups for p in group["params"]):
            raise ValueError("param is not in this optimizer's param groups")
        if mask is None:
            self._soft_masks.pop(param, None)
            return
        self._soft_masks[param] = checked_soft_mask(param, mask)

    def state_dict(self) -> dict:
        """``torch.optim.Optimizer.state_dict``, with each soft mask as its parameter's ``"soft_mask"`` entry.

        ``torch.optim.AdamW`` loads such a state dict and keeps the masks as
        state it does not use, except the entry of a parameter that has a mask
        but has not stepped yet, which holds only the mask: torch refuses it
        (``KeyError: 'step'``), and :func:`strip_soft_masks` removes it. The
        masks are added after the state-dict hooks have run.
        """
        return with_soft_masks(super().state_dict(), self.param_groups, self._soft_masks)


def checked_soft_mask(param: Tensor, mask) -> Tensor:
    """``mask`` for ``param`` as the step reads it (fp32, contiguous); raises if it does not fit ``param``."""
    if not isinstance(mask, Tensor) or not mask.is_floating_point():
        raise TypeError(f"mask must be a floating-point tensor, got {type(mask).__name__}")
    rows = (param.shape[0],) if param.dim() else ()
    if mask.shape not in (torch.Size(rows), param.shape):
        raise ValueError(
            f"mask must have shape {tuple(rows)} (per row) or {tuple(param.shape)} (per entry), got {tuple(mask.shape)}"
        )
    if mask.device != param.device:
        raise ValueError(f"mask must be on the param's device {param.device}, got {mask.device}")
    if mask.numel() and not (mask.min() >= 0 and mask.max() <= 1):
        raise ValueError("mask values must be in [0, 1]")
    mask = mask.detach().to(torch.float32)
    if param.is_complex() and mask.shape == param.shape:
        # A complex param steps as its real view: the factor of an entry scales both of its parts.
        mask = mask.unsqueeze(-1).expand(*mask.shape, 2)
    return mask.contiguous()


def given_soft_mask(param: Tensor, mask: Tensor) -> Tensor:
    """The mask as :meth:`selopt.AdamW.set_soft_mask` took it, from the form the step reads."""
    if param.is_complex() and mask.dim() == param.dim() + 1:
        return mask[..., 0]  # a full-shape mask of a complex param is kept at its real view's shape
    return mask


def loaded_soft_mask(param_id, mask, param: Tensor) -> Tensor:
    """A saved ``"soft_mask"`` entry for ``param``, checked as :meth:`selopt.AdamW.set_soft_mask` checks it."""
    try:
        return checked_soft_mask(param, mask.to(param.device) if isinstance(mask, Tensor) else mask)
    except (TypeError, ValueError) as error:
        raise type(error)(f"state_dict['state'][{param_id!r}]['soft_mask']: {error}") from None


def with_soft_masks(state_dict: dict, param_groups: list[dict], masks: dict[Tensor, Tensor]) -> dict:
    """``state_dict`` (torch's packing: params numbered across groups) with each mask as its param's entry."""
    if masks:
        params = (p for group in param_groups for p in group["params"])
        index = {id(p): i for i, p in enumerate(params)}
        for param, mask in masks.items():
            i = index[id(param)]
            # torch packs the live state dicts: add to a copy.
            state_dict["state"][i] = {**state_dict["state"].get(i, {}), SOFT_MASK: given_soft_mask(param, mask)}
    return state_dict


def strip_soft_masks(state_dict: dict) -> dict:
    """A copy of a selopt ``state_dict`` without its soft masks, for an optimizer that has no use for them.

    ``torch.optim.AdamW`` loads a selopt state dict as it is and ignores the
    masks, except where a parameter has a mask but had not stepped when the
    state dict was saved: its entry holds only the mask, and torch's
    ``load_state_dict`` raises ``KeyError: 'step'``. Stripping drops those
    entries (the parameter then starts fresh, as it would in selopt) and the
    ``"soft_mask"`` key of the others.

    >>> layer = torch.nn.Linear(3, 2)
    >>> opt = selopt.AdamW(layer.parameters())
    >>> opt.set_soft_mask(layer.weight, torch.tensor([1.0, 0.25]))
    >>> torch_opt = torch.optim.AdamW(layer.parameters())
    >>> torch_opt.load_state_dict(strip_soft_masks(opt.state_dict()))
    """
    state = {}
    for key, entry in state_dict["state"].items():
        entry = {name: value for name, value in entry.items() if name != SOFT_MASK}
        if entry:
            state[key] = entry
    return {**state_dict, "state": state}
