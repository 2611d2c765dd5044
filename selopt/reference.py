"""Pure-torch reference of one selective AdamW step: the ground truth.

Written to be read, not to be fast: the Triton kernels are tested against it,
and ``backend="torch"`` runs it. The five steps of ``docs/design.md`` §1, for
a parameter ``p`` with gradient ``g`` and step count ``t``:

1. the effective gradient: ``g / grad_scale`` (GradScaler), ``-g`` to maximize,
   ``s * g`` for a soft mask ``s`` in ``"grad"`` mode;
2. dense moments: ``m = b1*m + (1-b1)*g``, ``v = b2*v + (1-b2)*g*g``
   (``vmax = max(vmax, v)`` replaces ``v`` below with amsgrad);
3. the selection ``S`` (:mod:`selopt.selection`): per block the ``k`` largest
   ``|m|``, ties included, NaN above every number, 0 never;
4. decoupled decay ``p = p * (1 - lr*wd)`` on every entry (``decay="all"``) or
   on ``S`` only (``decay="selected"``);
5. ``p = p - lr * s * [S] * m_hat / (sqrt(v_hat) + eps)``, with ``s`` applied
   here in ``"update"`` mode.

8-bit moments (:mod:`selopt.quantization`) are read dequantized, and the new
ones rounded through the 8-bit format before steps 3-5 read them, as bf16
moments are rounded to bf16: every step reads a moment as its state holds it.

Steps 1-2 are :func:`adam_moments`, 4-5 :func:`apply_update`, so a caller that
chooses ``S`` itself (the sharded path agrees on a threshold across ranks)
computes ``m`` once. With ``fraction=1`` and no soft mask the operations and
their order are ``torch.optim.AdamW(foreach=False)``'s: the two agree bit for
bit in fp32 and fp64. If ``found_inf`` is set, nothing (parameter, moments,
step) changes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from selopt import quantization
from selopt.bucket import STATE_KEYS, Bucket
from selopt.options import AdamWOptions
from selopt.selection import block_k, selection_mask

__all__ = ["AdamWOptions", "Moments", "QuantizedMoment", "StepResult", "adam_moments", "adamw_math", "adamw_step_", "apply_update",
           "as_stored_param", "block_k", "compute_dtype", "effective_grad", "expand_soft_mask", "prepare_adamw",
           "rounding_generator", "selection_mask", "stochastic_round_to_bf16", "store_moments_", "stored_moments",
           "tensor_state", "update_param_"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the step is computed in: fp64 stays fp64, everything else is fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def expand_soft_mask(soft_mask: Tensor, param: Tensor) -> Tensor:
    """Broadcast a per-row mask ``(rows,)`` or a full-shape mask against ``param``."""
    if soft_mask.shape == param.shape:
        return soft_mask
    return soft_mask.view(-1, *([1] * (param.dim() - 1)))


def effective_grad(param: Tensor, grad: Tensor, *, maximize: bool = False, soft_mask: Tensor | None = None,
                   soft_mask_mode: str = "update", grad_scale: Tensor | None = None) -> Tensor:
    """Step 1: the gradient the moments see, in :func:`compute_dtype`: unscaled, negated, soft-masked.

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


class Moments(NamedTuple):
    """New moments of one parameter, in the compute dtype (steps 1-2).

    For 8-bit state, ``encoded`` holds the codes and scales of ``exp_avg`` and
    ``exp_avg_sq`` that the values stand for, quantized once from the fresh
    moments: what :func:`store_moments_` writes (quantizing the rounded values
    again could change a scale, since no code stands for -1).
    """

    exp_avg: Tensor
    exp_avg_sq: Tensor
    max_exp_avg_sq: Tensor | None
    encoded: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None

    @property
    def second_moment(self) -> Tensor:
        """What the denominator uses: ``max_exp_avg_sq`` with amsgrad, else ``exp_avg_sq``."""
        return self.exp_avg_sq if self.max_exp_avg_sq is None else self.max_exp_avg_sq


class QuantizedMoment(NamedTuple):
    """A moment kept in 8 bits: ``uint8`` codes shaped like the param and fp32 block scales.

    ``signed``: the code map of ``exp_avg`` (True) or ``exp_avg_sq`` (False).
    """

    codes: Tensor
    scales: Tensor
    signed: bool

    @property
    def dtype(self) -> torch.dtype:
        return self.codes.dtype

    def values(self) -> Tensor:
        """The fp32 values the state stands for."""
        return quantization.dequantize(self.codes, self.scales, self.signed)

    def encoded(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x``'s codes and scales."""
        return quantization.quantize(x, quantization.block_of(self.codes, self.scales), self.signed)


Stored = Tensor | QuantizedMoment


def stored_moments(state: dict) -> tuple[Stored, Stored, Tensor | None]:
    """``state``'s ``exp_avg``, ``exp_avg_sq`` and ``max_exp_avg_sq`` (None if absent), 8-bit ones as
    :class:`QuantizedMoment`: what :func:`adam_moments` reads and :func:`store_moments_` writes.

    >>> stored_moments({"exp_avg": torch.zeros(2), "exp_avg_sq": torch.ones(2)})[1].tolist()
    [1.0, 1.0]
    """
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    if state.get("exp_avg_scale") is not None:
        exp_avg = QuantizedMoment(exp_avg, state["exp_avg_scale"], signed=True)
        exp_avg_sq = QuantizedMoment(exp_avg_sq, state["exp_avg_sq_scale"], signed=False)
    return exp_avg, exp_avg_sq, state.get("max_exp_avg_sq")


def _values(stored: Stored, dtype: torch.dtype) -> Tensor:
    return (stored.values() if isinstance(stored, QuantizedMoment) else stored).to(dtype)


def adam_moments(param: Tensor, grad: Tensor, exp_avg: Stored, exp_avg_sq: Stored, max_exp_avg_sq: Tensor | None,
                 *, options: AdamWOptions, soft_mask: Tensor | None = None,
                 grad_scale: Tensor | None = None) -> Moments:
    """Steps 1-2: the dense moments after this step's gradient, as their state stores them; inputs are not modified.

    ``exp_avg`` and ``exp_avg_sq`` are tensors or, for 8-bit state, :class:`QuantizedMoment`\\ s
    (:func:`stored_moments`).

    >>> z = torch.zeros(2)
    >>> adam_moments(z, torch.tensor([1.0, -2.0]), z, z, None, options=AdamWOptions()).exp_avg.tolist()
    [0.10000000149011612, -0.20000000298023224]
    """
    dtype = compute_dtype(param.dtype)
    g = effective_grad(param, grad, maximize=options.maximize, soft_mask=soft_mask,
                       soft_mask_mode=options.soft_mask_mode, grad_scale=grad_scale)
    beta1, beta2 = options.beta1, options.beta2
    m = _values(exp_avg, dtype).lerp(g, 1 - beta1)
    v = _values(exp_avg_sq, dtype).mul(beta2).addcmul(g, g, value=1 - beta2)
    # The selection and the update read a moment as its state holds it (bf16 moments of fp32 params
    # rounded once, 8-bit ones quantized), so every path, whichever rereads the state, computes the same step.
    if isinstance(exp_avg, QuantizedMoment):
        encoded = exp_avg.encoded(m), exp_avg_sq.encoded(v)
        m, v = (quantization.dequantize(*codes, signed).to(dtype) for codes, signed in zip(encoded, (True, False)))
        return Moments(m, v, None, encoded)
    m, v = _as_stored(m, exp_avg.dtype), _as_stored(v, exp_avg_sq.dtype)
    vmax = torch.maximum(max_exp_avg_sq.to(dtype), v) if options.amsgrad else None
    return Moments(m, v, vmax)


def _as_stored(moment: Tensor, state_dtype: torch.dtype) -> Tensor:
    return moment if moment.dtype == state_dtype else moment.to(state_dtype).to(moment.dtype)


def apply_update(param: Tensor, moments: Moments, selected: Tensor, *, step: float, options: AdamWOptions,
                 soft_mask: Tensor | None = None) -> Tensor:
    """Steps 4-5: the new parameter, in the compute dtype, moving only the ``selected`` entries.

    ``step`` is the count *after* this update (1 on the first step).

    >>> p, m = torch.ones(2), Moments(torch.tensor([0.1, 0.1]), torch.full((2,), 1e-3), None)
    >>> new = apply_update(p, m, torch.tensor([True, False]), step=1, options=AdamWOptions(lr=0.1))
    >>> new.round(decimals=4).tolist()  # decayed by lr * weight_decay; the selected one also steps by lr
    [0.8989999890327454, 0.9990000128746033]
    """
    dtype = compute_dtype(param.dtype)
    p = param.detach().to(dtype)
    lr, beta1, beta2 = float(options.lr), options.beta1, options.beta2
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = (moments.second_moment.sqrt() / bias_correction2**0.5).add_(options.eps)

    if options.weight_decay != 0:
        decayed = p.mul(1 - lr * options.weight_decay)
        p = decayed if options.decay == "all" else torch.where(selected, decayed, p)
    numerator = moments.exp_avg
    if soft_mask is not None and options.soft_mask_mode == "update":
        numerator = numerator * expand_soft_mask(soft_mask, param).to(dtype)
    # where() rather than a multiply by [S]: an unselected entry keeps p exactly,
    # even where m/denom is NaN (eps=0 with v=0).
    return torch.where(selected, p.addcdiv(numerator, denom, value=-step_size), p)


class StepResult(NamedTuple):
    """New values of one parameter's tensors, in the compute dtype."""

    param: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    max_exp_avg_sq: Tensor | None
    selected: Tensor


def adamw_math(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, max_exp_avg_sq: Tensor | None,
               *, step: float, options: AdamWOptions, soft_mask: Tensor | None = None,
               grad_scale: Tensor | None = None) -> StepResult:
    """One selective AdamW step (steps 1-5) as a pure function: inputs are not modified.

    ``step`` is the count *after* this update. Returns the new parameter and
    moments in :func:`compute_dtype` and the selection.

    >>> p, g = torch.zeros(4, dtype=torch.float64), torch.tensor([1.0, -4, 2, 0.5], dtype=torch.float64)
    >>> z = torch.zeros_like(p)
    >>> out = adamw_math(p, g, z, z, None, step=1, options=AdamWOptions(lr=0.1, weight_decay=0.0, fraction=0.5))
    >>> out.selected.tolist(), out.param.round(decimals=6).tolist()
    ([False, True, True, False], [0.0, 0.1, -0.1, 0.0])
    """
    moments = adam_moments(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, options=options,
                           soft_mask=soft_mask, grad_scale=grad_scale)
    selected = selection_mask(moments.exp_avg, options.fraction, options.block_size)
    new_param = apply_update(param, moments, selected, step=step, options=options, soft_mask=soft_mask)
    return StepResult(new_param, moments.exp_avg, moments.exp_avg_sq, moments.max_exp_avg_sq, selected)


def stochastic_round_to_bf16(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Round fp32 to bf16 up or down with probability given by the distance, so E[round(x)] = x.

    Adds 16 random low bits to the fp32 pattern and truncates them away.
    """
    bits = x.float().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = ((bits + noise) & -65536).view(torch.float32)
    # Non-finite values must not carry into the exponent (inf + noise would become NaN).
    return torch.where(x.isfinite(), rounded, x).to(torch.bfloat16)


def as_stored_param(new_param: Tensor, param: Tensor, *, seed: Tensor | None, step: float,
                    options: AdamWOptions) -> Tensor:
    """``new_param`` (compute dtype) as it goes into ``param``: stochastically rounded to bf16 when the
    options ask for it (drawn from ``seed`` and ``step``, else from torch's generator), else as is (the
    store rounds it to nearest).

    >>> as_stored_param(torch.tensor([1.0]), torch.ones(1), seed=None, step=1, options=AdamWOptions()).tolist()
    [1.0]
    """
    if not (options.stochastic_rounding and param.dtype == torch.bfloat16):
        return new_param
    generator = None if seed is None else rounding_generator(seed, step, param.device)
    return stochastic_round_to_bf16(new_param, generator)


def rounding_generator(seed: Tensor, step: float, device: torch.device) -> torch.Generator:
    """The generator of one parameter's stochastic rounding at one step: its seed and the step count.

    Derived from state the optimizer saves (the per-parameter seed and the step),
    so a resumed run draws the same numbers as an uninterrupted one.
    """
    mixed = (int(seed) + int(step) * 0x9E3779B97F4A7C15) % (1 << 63)  # odd multiplier: steps map apart
    return torch.Generator(device=device).manual_seed(mixed)


def _commit_(dst: Tensor, new: Tensor, found_inf: Tensor | None) -> None:
    if found_inf is not None:
        new = torch.where(found_inf.to(dst.device).bool(), dst, new.to(dst.dtype))
    dst.copy_(new)


def _store_(stored: Stored, new: Tensor, encoded: tuple[Tensor, Tensor] | None, found_inf: Tensor | None) -> None:
    if isinstance(stored, QuantizedMoment):
        for dst, value in zip((stored.codes, stored.scales), stored.encoded(new) if encoded is None else encoded):
            _commit_(dst, value, found_inf)
    else:
        _commit_(stored, new, found_inf)


def store_moments_(state: dict, moments: Moments, found_inf: Tensor | None = None) -> None:
    """Write steps 1-2's moments into ``state`` (rounded once to its dtype, or their 8-bit codes and
    scales); unchanged when ``found_inf`` is set."""
    exp_avg, exp_avg_sq, max_exp_avg_sq = stored_moments(state)
    encoded = moments.encoded or (None, None)
    _store_(exp_avg, moments.exp_avg, encoded[0], found_inf)
    _store_(exp_avg_sq, moments.exp_avg_sq, encoded[1], found_inf)
    if moments.max_exp_avg_sq is not None:
        _commit_(max_exp_avg_sq, moments.max_exp_avg_sq, found_inf)


def update_param_(param: Tensor, state: dict, selected: Tensor, *, options: AdamWOptions,
                  moments: Moments | None = None, soft_mask: Tensor | None = None,
                  found_inf: Tensor | None = None) -> None:
    """Steps 4-5 in place, then advance ``state["step"]``; ``moments`` default to the stored ones.

    A low-precision param is rounded once on store, stochastically for bf16
    when the options ask for it (from ``state["rounding_seed"]`` when there is
    one, else from torch's generator).
    """
    step_tensor = state["step"]
    step = float(step_tensor) + 1
    if moments is None:
        dtype = compute_dtype(param.dtype)
        exp_avg, exp_avg_sq, vmax = stored_moments(state)
        vmax = vmax if options.amsgrad else None
        moments = Moments(_values(exp_avg, dtype), _values(exp_avg_sq, dtype), None if vmax is None else vmax.to(dtype))
    new_param = apply_update(param, moments, selected, step=step, options=options, soft_mask=soft_mask)
    _commit_(param, as_stored_param(new_param, param, seed=state.get("rounding_seed"), step=step, options=options),
             found_inf)
    step_tensor.add_(1 if found_inf is None else 1 - found_inf.to(step_tensor))


@torch.no_grad()
def adamw_step_(param: Tensor, grad: Tensor, state: dict, *, options: AdamWOptions,
                soft_mask: Tensor | None = None, grad_scale: Tensor | None = None,
                found_inf: Tensor | None = None) -> Tensor:
    """Steps 1-5 in place on ``param`` and its optimizer ``state``; returns the selection.

    ``state`` holds torch's keys (``step``, ``exp_avg``, ``exp_avg_sq`` and, with
    amsgrad, ``max_exp_avg_sq``), for stochastic rounding of a bf16 param
    ``rounding_seed``, and for 8-bit moments ``exp_avg_scale`` and ``exp_avg_sq_scale``. A set ``found_inf`` leaves everything unchanged without a
    host synchronisation.

    >>> p, g = torch.ones(3), torch.tensor([1.0, -2.0, 0.5])
    >>> state = {"step": torch.tensor(0.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}
    >>> adamw_step_(p, g, state, options=AdamWOptions(lr=0.1, weight_decay=0.0, fraction=0.34)).tolist()
    [False, True, False]
    """
    moments = adam_moments(param, grad, *stored_moments(state), options=options, soft_mask=soft_mask,
                           grad_scale=grad_scale)
    selected = selection_mask(moments.exp_avg, options.fraction, options.block_size)
    store_moments_(state, moments, found_inf)
    update_param_(param, state, selected, options=options, moments=moments, soft_mask=soft_mask, found_inf=found_inf)
    return selected


def prepare_adamw(bucket: Bucket, options: AdamWOptions, *, grad_scale=None, found_inf=None, cache=None):
    """The reference implementation: :func:`adamw_step_` tensor by tensor.

    The signature of every implementation (:mod:`selopt.bucket`); ``cache`` is
    unused. The step counts are read on the host (a device count syncs).
    """
    def step() -> None:
        for i, p in enumerate(bucket.params):
            tensors = bucket.tensors(i)
            selected = adamw_step_(p, tensors["grads"], tensor_state(tensors), options=options,
                                   soft_mask=tensors["soft_masks"], grad_scale=grad_scale, found_inf=found_inf)
            if tensors["selections"] is not None:
                tensors["selections"].copy_(selected)
    return step


def tensor_state(tensors: dict) -> dict:
    """One param's state dict, as :func:`adamw_step_` reads it, from its entries of a bucket (:meth:`Bucket.tensors`).

    >>> z = torch.zeros(1)
    >>> tensor_state(Bucket([z], [z], [z], [torch.ones(1)], [torch.tensor(3.0)]).tensors(0))["exp_avg_sq"]
    tensor([1.])
    """
    return {key: tensors[name] for name, key in STATE_KEYS.items()}
