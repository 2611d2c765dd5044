"""The options of a selopt param group, defined once (``docs/design.md`` §4).

:class:`AdamWOptions` is the only list of selopt's hyper-parameters: the
optimizer's defaults, the keys of its param groups, the validation of each
value and what the paths derive from them (the reference's keywords, the
kernels' flags and scalars) all come from its fields. Adding an option means
adding a field here (with its check) and using it where it acts.

A param group is validated into an :class:`AdamWOptions` when it is added or
loaded. At each step :meth:`AdamWOptions.of` compares the group's values with
the ones it was validated from by identity, so a group nobody touched costs
one tuple of lookups, and a value a scheduler changed (``lr`` each step, or
anything else torch lets users set in a group) is checked alone.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

DECAY_MODES = ("all", "selected")
SOFT_MASK_MODES = ("update", "grad")
BACKENDS = ("auto", "triton", "torch")
MOMENT_DTYPE_CHOICES = (None, torch.float32, torch.bfloat16)

# The ranges a numeric hyper-parameter may take, spelled as the error messages print them.
_RANGES = {
    ">= 0": lambda x: x >= 0,
    "in [0, 1)": lambda x: 0 <= x < 1,
    "in (0, 1]": lambda x: 0 < x <= 1,
}


def _check_number(name: str, value, allowed: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number {allowed}, got {type(value).__name__}")
    if not _RANGES[allowed](value):  # NaN fails every comparison, so it is refused too
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _number(allowed: str) -> Callable:
    return lambda name, value, options: _check_number(name, value, allowed)


def _flag(name: str, value, options) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def _optional_flag(name: str, value, options) -> None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name} must be None, True or False, got {value!r}")


def _one_of(choices: tuple) -> Callable:
    def check(name: str, value, options) -> None:
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return check


def _check_tensor_hyperparameter(name: str, value: Tensor, options: AdamWOptions) -> None:
    # torch.optim.AdamW's rules for lr and betas given as tensors, with its exception types, so that a
    # configuration is valid for both optimizers or for neither. (The foreach rule is a limit of
    # torch's foreach implementation; selopt keeps it so that switching back to torch cannot break.)
    if value.numel() != 1:
        raise ValueError(f"{name} as a tensor must have exactly one element, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} as a tensor must be floating-point, got {value.dtype}")
    if options.foreach and not options.capturable:
        raise ValueError(f"{name} as a tensor needs capturable=True when foreach=True (as in torch.optim.AdamW)")


def _lr(name: str, lr, options: AdamWOptions) -> None:
    if not isinstance(lr, Tensor):
        return _check_number(name, lr, ">= 0")
    _check_tensor_hyperparameter(name, lr, options)
    if lr.device.type == "cpu":  # a device lr is not read back: that would sync the host
        _check_number(name, lr.item(), ">= 0")


def _betas(name: str, betas, options: AdamWOptions) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
        raise ValueError(f"betas must be both numbers or both tensors (as in torch.optim.AdamW), got {betas!r}")
    for i, beta in enumerate(betas):
        name = f"betas[{i}]"
        if isinstance(beta, Tensor):
            _check_tensor_hyperparameter(name, beta, options)
            if options.capturable and beta.device.type != "cpu":
                raise ValueError(
                    f"{name} is a tensor on {beta.device}: selopt reads betas on the host each step, which a "
                    f"captured graph cannot do; with capturable=True give betas as numbers or CPU tensors"
                )
            beta = beta.item()
        _check_number(name, beta, "in [0, 1)")


def _differentiable(name: str, value, options) -> None:
    _flag(name, value, options)
    if value:
        # NotImplementedError is a RuntimeError: torch's type when it refuses differentiable=True with fused=True.
        raise NotImplementedError(
            "differentiable=True is not supported: selopt's step runs under torch.no_grad and updates in place; "
            "use differentiable=False (the default)"
        )


def _decoupled(name: str, value, options) -> None:
    if value is not True:
        raise ValueError(f"{name} must be True (selopt's weight decay is AdamW's, decoupled), got {value!r}")


def _block_size(name: str, value, options) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0
                              or value & (value - 1)):
        raise ValueError(f"{name} must be None (one block per tensor) or a positive power of two, got {value!r}")


def _option(default: Any, check: Callable) -> Any:
    return field(default=default, metadata={"check": check})


@dataclass(frozen=True)
class AdamWOptions:
    """One param group's hyper-parameters, checked: torch.optim.AdamW's, then selopt's.

    Construction validates every value and raises (with torch's exception
    type where torch also refuses it) naming the option. See
    :class:`selopt.AdamW` for what each one means.

    >>> options = AdamWOptions(lr=1e-4, fraction=0.15)
    >>> options.beta1, options.dense
    (0.9, False)
    >>> AdamWOptions(fraction=0)
    Traceback (most recent call last):
    ...
    ValueError: fraction must be in (0, 1], got 0
    """

    lr: float | Tensor = _option(1e-3, _lr)
    betas: tuple = _option((0.9, 0.999), _betas)
    eps: float = _option(1e-8, _number(">= 0"))
    weight_decay: float = _option(1e-2, _number(">= 0"))
    amsgrad: bool = _option(False, _flag)
    maximize: bool = _option(False, _flag)
    foreach: bool | None = _option(None, _optional_flag)
    capturable: bool = _option(False, _flag)
    differentiable: bool = _option(False, _differentiable)
    fused: bool | None = _option(None, _optional_flag)
    # Not an argument, but a group key of torch.optim.AdamW (always True there): with it, selopt's
    # groups carry every key torch's do, and state dicts round-trip unchanged.
    decoupled_weight_decay: bool = _option(True, _decoupled)
    fraction: float = _option(1.0, _number("in (0, 1]"))
    block_size: int | None = _option(None, _block_size)
    decay: str = _option("all", _one_of(DECAY_MODES))
    soft_mask_mode: str = _option("update", _one_of(SOFT_MASK_MODES))
    moment_dtype: torch.dtype | None = _option(None, _one_of(MOMENT_DTYPE_CHOICES))
    stochastic_rounding: bool = _option(False, _flag)
    backend: str = _option("auto", _one_of(BACKENDS))

    def __post_init__(self) -> None:
        self._check(NAMES)

    def _check(self, names) -> None:
        # Flags first: the number checks read foreach and capturable.
        for name in sorted(names, key=lambda name: name not in _FLAGS):
            _CHECKS[name](name, getattr(self, name), self)
        if self.foreach and self.fused:
            raise RuntimeError("foreach=True and fused=True cannot be set together (as in torch.optim.AdamW)")

    @classmethod
    def from_group(cls, group: dict) -> AdamWOptions:
        """Validate a param group (every option key present)."""
        return cls(**{name: group[name] for name in NAMES})

    def of(self, group: dict) -> AdamWOptions:
        """``group``'s options now, given that ``self`` was validated from it: only changed values are checked.

        >>> group = {name: getattr(AdamWOptions(), name) for name in NAMES}
        >>> options = AdamWOptions.from_group(group)
        >>> group["lr"] = 5e-4  # a scheduler
        >>> options.of(group).lr
        0.0005
        """
        values = operator.itemgetter(*NAMES)(group)
        if all(map(operator.is_, values, self._values)):
            return self
        changed = {name: value for name, value, old in zip(NAMES, values, self._values) if value is not old}
        options = copy.copy(self)
        for name, value in changed.items():
            object.__setattr__(options, name, value)
        options.__dict__.pop("_values", None)
        # foreach and capturable change what a tensor lr or betas may be: then everything is checked.
        options._check(NAMES if changed.keys() & _FLAGS else changed)
        return options

    @property
    def _values(self) -> tuple:
        # Cached in the instance's __dict__ (frozen dataclasses allow that): the identities `of` compares.
        values = self.__dict__.get("_values")
        if values is None:
            values = self.__dict__["_values"] = tuple(getattr(self, name) for name in NAMES)
        return values

    def differ_only_in_scalars(self, other: AdamWOptions) -> bool:
        """Whether ``other`` steps as ``self`` does but for the step's numbers (lr, betas, eps, weight decay).

        Such options share an implementation and its launch plans; only the
        scalar arguments change (an lr scheduler's steps, say).

        >>> AdamWOptions(lr=1e-3).differ_only_in_scalars(AdamWOptions(lr=5e-4))
        True
        >>> AdamWOptions().differ_only_in_scalars(AdamWOptions(fraction=0.5))
        False
        """
        return all(a is b or a == b for name, a, b in zip(NAMES, self._values, other._values)
                   if name not in _SCALARS)

    def group_defaults(self) -> dict:
        """The options as torch stores them: the keys of a param group."""
        return {name: getattr(self, name) for name in NAMES}

    @property
    def beta1(self) -> float:
        """``betas[0]`` as a Python number (one-element tensor betas are read on the host)."""
        return _as_number(self.betas[0])

    @property
    def beta2(self) -> float:
        return _as_number(self.betas[1])

    @property
    def dense(self) -> bool:
        """Every entry moves (``fraction == 1``): plain AdamW, no selection."""
        return self.fraction >= 1.0


def _as_number(value) -> float:
    return value.item() if isinstance(value, Tensor) else value


NAMES = tuple(f.name for f in dataclasses.fields(AdamWOptions))
_CHECKS = {f.name: f.metadata["check"] for f in dataclasses.fields(AdamWOptions)}
_FLAGS = {"foreach", "capturable"}
_SCALARS = {"lr", "betas", "eps", "weight_decay"}


# torch.optim.AdamW's positional parameters after ``params``; every other option is keyword-only.
_POSITIONAL = ("lr", "betas", "eps", "weight_decay", "amsgrad")
_NOT_ARGUMENTS = ("decoupled_weight_decay",)  # always True: a group key, never an argument


def optimizer_signature(**defaults) -> inspect.Signature:
    """The optimizer classes' signature: torch.optim.AdamW's, then selopt's options, keyword-only.

    ``defaults`` replaces the options' own defaults (MoFO's ``fraction``).

    >>> str(optimizer_signature(fraction=0.15)).startswith("(params, lr=0.001, betas=(0.9, 0.999)")
    True
    """
    kinds = {name: inspect.Parameter.POSITIONAL_OR_KEYWORD for name in _POSITIONAL}
    parameters = [inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for f in dataclasses.fields(AdamWOptions):
        if f.name not in _NOT_ARGUMENTS:
            kind = kinds.get(f.name, inspect.Parameter.KEYWORD_ONLY)
            parameters.append(inspect.Parameter(f.name, kind, default=defaults.get(f.name, f.default)))
    return inspect.Signature(parameters)
