"""The one thing that flows from the optimizer to an implementation: a :class:`Bucket` of tensors.

A bucket is the tensors of one step that share a device, a param dtype, a
moment dtype and sharding, as parallel lists (entry ``i`` of every field
belongs to ``params[i]``). The optimizer builds buckets from its param groups
and state, :func:`selopt.functional.choose_implementation` picks an
implementation per bucket, and every implementation is called as
``prepare(bucket, options, grad_scale=..., found_inf=..., cache=...)`` with the
group's :class:`~selopt.options.AdamWOptions` and the step's GradScaler
tensors. Fields are read by name, never by position.

:data:`STATE_KEYS` is the one map from the fields that live in the optimizer
state to torch's state keys, and :meth:`Bucket.layout` the one list of
the addresses a step reaches: the kernels key their launch plans by it, and
a replayed step is valid only while it is unchanged.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from selopt.options import AdamWOptions

# Bucket fields kept in the optimizer's per-param state, and their state keys (torch's, then selopt's).
STATE_KEYS = {"exp_avgs": "exp_avg", "exp_avg_sqs": "exp_avg_sq", "max_exp_avg_sqs": "max_exp_avg_sq",
              "steps": "step", "rounding_seeds": "rounding_seed",
              "exp_avg_scales": "exp_avg_scale", "exp_avg_sq_scales": "exp_avg_sq_scale"}


@dataclass
class Bucket:
    """The tensors of one bucket, one entry per param; optional fields are None or hold None entries.

    ``steps`` are the counts before this step (one-element fp32 tensors, advanced
    by 1); ``max_exp_avg_sqs`` exist with amsgrad; ``soft_masks`` are per row or
    full shape (fp32); ``rounding_seeds`` int64, for stochastic rounding of bf16
    params; ``selections`` bool buffers that receive the selection.

    >>> import torch
    >>> bucket = Bucket([torch.zeros(3)], [torch.ones(3)], [torch.zeros(3)], [torch.zeros(3)], [torch.tensor(0.0)])
    >>> len(bucket), bucket.column("soft_masks")
    (1, [None])
    """

    params: Sequence[Tensor]
    grads: Sequence[Tensor]
    exp_avgs: Sequence[Tensor]
    exp_avg_sqs: Sequence[Tensor]
    steps: Sequence[Tensor]
    max_exp_avg_sqs: Sequence[Tensor] | None = None
    soft_masks: Sequence[Tensor | None] | None = None
    rounding_seeds: Sequence[Tensor | None] | None = None
    selections: Sequence[Tensor | None] | None = None
    exp_avg_scales: Sequence[Tensor] | None = None
    exp_avg_sq_scales: Sequence[Tensor] | None = None

    def __len__(self) -> int:
        return len(self.params)

    def column(self, name: str) -> list:
        """Field ``name`` as a list with an entry per param (None entries for an absent optional field)."""
        values = getattr(self, name)
        return [None] * len(self.params) if values is None else list(values)

    def tensors(self, index: int) -> dict:
        """Every field's entry for param ``index``, by field name (None where it has none)."""
        return {name: None if values is None else values[index] for name, values in self.fields()}

    def fields(self) -> list[tuple[str, Sequence | None]]:
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]

    def select(self, indices: Sequence[int]) -> Bucket:
        """The bucket of the params at ``indices``."""
        return Bucket(**{name: None if values is None else [values[i] for i in indices]
                         for name, values in self.fields()})

    def replace(self, **fields) -> Bucket:
        return dataclasses.replace(self, **fields)

    def layout(self) -> tuple:
        """What a step prepared for this bucket assumed: every tensor's address, field by field (0 for a
        missing one), and which params and grads are contiguous (sizes are the plan key's own).

        The kernels key their launch plans by it, and a replayed step is valid
        while it is unchanged (:class:`selopt.kernels.tables.PlanCache`).
        """
        # Built on every step of a replayed group, so each required field is one C-level map.
        return (tuple(map(Tensor.is_contiguous, self.params)), tuple(map(Tensor.is_contiguous, self.grads)),
                *(tuple(map(Tensor.data_ptr, getattr(self, name))) for name in _REQUIRED),
                *(None if values is None else tuple([0 if t is None else t.data_ptr() for t in values])
                  for values in map(self.__getattribute__, _OPTIONAL)))

    @classmethod
    def from_state(cls, params: Sequence[Tensor], states: Sequence[dict], options: AdamWOptions, *,
                   soft_masks: Sequence[Tensor | None] | None = None,
                   selections: Sequence[Tensor | None] | None = None) -> Bucket:
        """The bucket of ``params`` with their grads and their state entries' tensors (:data:`STATE_KEYS`),
        as ``options`` step them: ``max_exp_avg_sqs`` with amsgrad, seeds with stochastic rounding."""
        def column(name: str) -> list:
            return list(map(operator.itemgetter(STATE_KEYS[name]), states))

        # Only bf16 params have a seed; a bucket's moments are all 8-bit or none is.
        seeds = [s.get(STATE_KEYS["rounding_seeds"]) for s in states] if options.stochastic_rounding else None
        quantized = bool(states) and STATE_KEYS["exp_avg_scales"] in states[0]
        return cls(params, list(map(_grad, params)), column("exp_avgs"), column("exp_avg_sqs"), column("steps"),
                   column("max_exp_avg_sqs") if options.amsgrad else None, soft_masks, seeds, selections,
                   column("exp_avg_scales") if quantized else None, column("exp_avg_sq_scales") if quantized else None)


_REQUIRED = ("params", "grads", "exp_avgs", "exp_avg_sqs", "steps")
_OPTIONAL = ("max_exp_avg_sqs", "soft_masks", "rounding_seeds", "selections", "exp_avg_scales", "exp_avg_sq_scales")
_grad = operator.attrgetter("grad")
