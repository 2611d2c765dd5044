"""Pure-torch reference of one selective AdamW step: the ground truth.

Everything here follows ``SPEC.md`` §1 line by line and is written to be read,
not to be fast. The Triton kernels are tested against it, and the optimizer's
``backend="torch"`` runs it. With ``fraction=1`` and no soft mask it performs
the same floating-point operations, in the same order, as
``torch.optim.AdamW(foreach=False)``, so the two agree bit for bit in fp32 and
fp64.

One step for a parameter ``p`` with gradient ``g`` and step count ``t``:

1. ``g = g / grad_scale`` (GradScaler), ``g = -g`` if maximizing, and
   ``g = s * g`` for a soft mask ``s`` in ``"grad"`` mode;
2. dense moments: ``m = b1*m + (1-b1)*g``, ``v = b2*v + (1-b2)*g*g``
   (``vmax = max(vmax, v)`` replaces ``v`` below with amsgrad);
3. selection ``S``: per block of ``n`` entries the ``k = max(1, floor(fraction*n))``
   largest ``|m|``, ties at the threshold included, NaN never;
4. decoupled decay ``p = p * (1 - lr*wd)`` on every entry (``decay="all"``) or
   on ``S`` only (``decay="selected"``);
5. ``p = p - lr * s * [S] * m_hat / (sqrt(v_hat) + eps)``, with ``s`` applied
   here in ``"update"`` mode.

If ``found_inf`` is set, nothing (parameter, moments, step) changes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

DECAY_MODES = ("all", "selected")
SOFT_MASK_MODES = ("update", "grad")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the step is computed in: fp64 stays fp64, everything else is fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_k(fraction: float, n: int) -> int:
    """Entries selected in a block of ``n``: ``max(1, floor(fraction * n))``.

    Computed on the host in Python floats, once, so that every backend selects
    the same count (the official MoFO code crashes when ``floor`` gives 0).

    >>> block_k(0.15, 100), block_k(0.15, 3)
    (15, 1)
    """
    return max(1, math.floor(fraction * n))


def selection_mask(exp_avg: Tensor, fraction: float, block_size: int | None = None) -> Tensor:
    """MoFO's selection: the entries of each block with the largest ``|m|``.

    The flattened tensor is cut into contiguous blocks of ``block_size`` (the
    last may be shorter), or is one block when ``block_size`` is None. In a
    block of ``n`` entries the threshold is the ``k``-th largest ``|m|``
    (:func:`block_k`), and every entry at or above it is selected, so ties can
    select more than ``k``. NaN ranks below every number and is never selected,
    except at ``fraction == 1``, which selects everything as dense AdamW does.

    >>> m = torch.tensor([0.1, -3.0, 2.0, 0.5])
    >>> selection_mask(m, 0.5).tolist()
    [False, True, True, False]
    """
    if fraction >= 1.0:
        return torch.ones_like(exp_avg, dtype=torch.bool)
    flat = exp_avg.detach().flatten()
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    is_nan = flat.isnan()
    # |m| >= 0, so -1 puts NaN below every real magnitude without changing the order of the rest.
    magnitude = flat.abs().masked_fill(is_nan, -1.0)
    n = magnitude.numel()
    block = n if block_size is None else block_size
    n_full = (n // block) * block if block else 0
    thresholds = []
    if n_full:
        full = magnitude[:n_full].view(-1, block)
        kth = full.topk(block_k(fraction, block), dim=1).values[:, -1:]
        thresholds.append(kth.expand(-1, block).reshape(-1))
    if n_full < n:
        tail = magnitude[n_full:]
        kth = tail.topk(block_k(fraction, tail.numel())).values[-1]
        thresholds.append(kth.expand(tail.numel()))
    threshold = torch.cat(thresholds) if thresholds else magnitude
    return ((magnitude >= threshold) & ~is_nan).view_as(exp_avg)


def expand_soft_mask(soft_mask: Tensor, param: Tensor) -> Tensor:
    """Broadcast a per-row mask ``(rows,)`` or a full-shape mask against ``param``."""
    if soft_mask.shape == param.shape:
        return soft_mask
    return soft_mask.view(-1, *([1] * (param.dim() - 1)))


def effective_grad(
    param: Tensor,
    grad: Tensor,
    *,
    maximize: bool = False,
    soft_mask: Tensor | None = None,
    soft_mask_mode: str = "update",
    grad_scale: Tensor | None = None,
) -> Tensor:
    """The gradient the moments see, in :func:`compute_dtype`: unscaled, negated, soft-masked.

    >>> effective_grad(torch.ones(2), torch.tensor([4.0, -2.0]), maximize=True,
    ...                grad_scale=torch.tensor(2.0)).tolist()
    [-2.0, 1.0]
    """
    dtype = compute_dtype(param.dtype)
    g = grad.to(dtype)
    if grad_scale is not None:
        g = g / grad_scale.to(dtype)
    if maximize:
        g = -g
    if soft_mask is not None and soft_mask_mode == "grad":
        g = g * expand_soft_mask(soft_mask, param).to(dtype)
    return g


def group_options(group: dict) -> dict:
    """The keywords of :func:`adamw_math` that a param group sets (all but the per-tensor ones).

    >>> group_options({"lr": 0.1, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
    ...                "maximize": False, "fraction": 0.5, "block_size": None, "decay": "all",
    ...                "soft_mask_mode": "update"})["beta2"]
    0.99
    """
    beta1, beta2 = group["betas"]
    return dict(
        lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
        amsgrad=group["amsgrad"], maximize=group["maximize"], fraction=group["fraction"],
        block_size=group["block_size"], decay=group["decay"], soft_mask_mode=group["soft_mask_mode"],
    )


class StepResult(NamedTuple):
    """New values of one parameter's tensors, in the compute dtype."""

    param: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    max_exp_avg_sq: Tensor | None
    selected: Tensor


def adamw_math(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    *,
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool = False,
    maximize: bool = False,
    fraction: float = 1.0,
    block_size: int | None = None,
    decay: str = "all",
    soft_mask: Tensor | None = None,
    soft_mask_mode: str = "update",
    grad_scale: Tensor | None = None,
    threshold: Tensor | None = None,
) -> StepResult:
    """One selective AdamW step as a pure function: inputs are not modified.

    ``step`` is the count *after* this update (1 on the first step). Returns
    the new parameter and moments in :func:`compute_dtype` and the selection.
    A given ``threshold`` (0-d, on ``|m|``) replaces the per-block top-k when
    ``fraction < 1``: the entries with ``|m| >= threshold`` are selected, NaN
    never. :mod:`selopt.distributed` passes one agreed by all shards of a tensor.

    >>> p, g = torch.zeros(4, dtype=torch.float64), torch.tensor([1.0, -4, 2, 0.5], dtype=torch.float64)
    >>> z = torch.zeros_like(p)
    >>> out = adamw_math(p, g, z, z, None, step=1, lr=0.1, beta1=0.9, beta2=0.999,
    ...                  eps=1e-8, weight_decay=0.0, fraction=0.5)
    >>> out.selected.tolist(), out.param.round(decimals=6).tolist()
    ([False, True, True, False], [0.0, 0.1, -0.1, 0.0])
    """
    dtype = compute_dtype(param.dtype)
    p = param.detach().to(dtype)
    g = effective_grad(param, grad, maximize=maximize, soft_mask=soft_mask,
                       soft_mask_mode=soft_mask_mode, grad_scale=grad_scale)
    scale = None if soft_mask is None else expand_soft_mask(soft_mask, param).to(dtype)

    m = exp_avg.to(dtype).lerp(g, 1 - beta1)
    v = exp_avg_sq.to(dtype).mul(beta2).addcmul(g, g, value=1 - beta2)
    vmax = torch.maximum(max_exp_avg_sq.to(dtype), v) if amsgrad else None
    if threshold is None or fraction >= 1.0:
        selected = selection_mask(m, fraction, block_size)
    else:
        selected = (m.abs() >= threshold) & ~m.isnan()

    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = ((vmax if amsgrad else v).sqrt() / bias_correction2**0.5).add_(eps)

    if weight_decay != 0:
        decayed = p.mul(1 - lr * weight_decay)
        p = decayed if decay == "all" else torch.where(selected, decayed, p)
    numerator = m if scale is None or soft_mask_mode == "grad" else m * scale
    # where() rather than a multiply by [S]: an unselected entry keeps p exactly,
    # even where m/denom is NaN (eps=0 with v=0).
    p = torch.where(selected, p.addcdiv(numerator, denom, value=-step_size), p)
    return StepResult(p, m, v, vmax, selected)


def stochastic_round_to_bf16(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Round fp32 to bf16 up or down with probability given by the distance, so E[round(x)] = x.

    Adds 16 random low bits to the fp32 pattern and truncates them away.
    """
    bits = x.float().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = ((bits + noise) & -65536).view(torch.float32)
    # Non-finite values must not carry into the exponent (inf + noise would become NaN).
    return torch.where(x.isfinite(), rounded, x).to(torch.bfloat16)


def _commit_(dst: Tensor, new: Tensor, found_inf: Tensor | None) -> None:
    if found_inf is not None:
        new = torch.where(found_inf.to(dst.device).bool(), dst, new.to(dst.dtype))
    dst.copy_(new)


def adamw_step_(
    param: Tensor,
    grad: Tensor,
    state: dict,
    *,
    found_inf: Tensor | None = None,
    stochastic_rounding: bool = False,
    generator: torch.Generator | None = None,
    **options,
) -> Tensor:
    """Apply :func:`adamw_math` in place to ``param`` and its optimizer ``state``.

    ``state`` holds torch's keys (``step``, ``exp_avg``, ``exp_avg_sq`` and, with
    amsgrad, ``max_exp_avg_sq``); ``options`` are :func:`adamw_math`'s keywords
    other than ``step``. A set ``found_inf`` leaves everything unchanged without
    a host synchronisation. Low-precision results are rounded once on store,
    stochastically for bf16 parameters when asked. Returns the selection.

    >>> p, g = torch.ones(3), torch.tensor([1.0, -2.0, 0.5])
    >>> state = {"step": torch.tensor(0.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}
    >>> adamw_step_(p, g, state, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8,
    ...             weight_decay=0.0, fraction=0.34).tolist()
    [False, True, False]
    """
    step_tensor = state["step"]
    result = adamw_math(
        param, grad, state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq"),
        step=float(step_tensor) + 1, **options,
    )
    new_param = result.param
    if stochastic_rounding and param.dtype == torch.bfloat16:
        new_param = stochastic_round_to_bf16(new_param, generator)
    with torch.no_grad():
        _commit_(param, new_param, found_inf)
        _commit_(state["exp_avg"], result.exp_avg, found_inf)
        _commit_(state["exp_avg_sq"], result.exp_avg_sq, found_inf)
        if result.max_exp_avg_sq is not None:
            _commit_(state["max_exp_avg_sq"], result.max_exp_avg_sq, found_inf)
        step_tensor.add_(1 if found_inf is None else 1 - found_inf.to(step_tensor))
    return result.selected
