"""The options of a selopt param group, defined once (``docs/design.md`` §4).

:class:`AdamWOptions` is the only list of selopt's hyper-parameters: the
optimizer's defaults, the keys of its param groups, the validation of each
value and what the paths derive from them (the reference's keywords, the
kernels' flags and scalars) all come from its fields. Adding an option means
adding a field here (with its check) and using it where it acts.

A param group is validated into an :class:`AdamWOptions` when it is added or
loaded. The group keeps the values as given, as torch's does; the options
hold them as the paths compute with them. At each step
:meth:`AdamWOptions.of` compares the group's values with the ones it was
validated from by identity, so a group nobody touched costs one tuple of
lookups, and a value a scheduler changed (``lr`` each step, or anything else
torch lets users set in a group) is checked alone, as is a value that can
change in place (a CPU tensor ``lr``, tensor ``betas``, ``eps`` or
``weight_decay``, a list of betas).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import numbers
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from selopt.quantization import EIGHT_BIT, QUANT_BLOCK

DECAY_MODES = ("all", "selected")
SOFT_MASK_MODES = ("update", "grad")
BACKENDS = ("auto", "triton", "torch")
MOMENT_DTYPE_CHOICES = (None, torch.float32, torch.bfloat16, EIGHT_BIT)

# The largest block one program of the one-pass kernel selects in its registers: larger blocks would
# spill on the GPUs selopt targets (bench.static), so they take the exact path, per block.
ONE_PASS_MAX_BLOCK = 4096

# The ranges a numeric hyper-parameter may take, spelled as the error messages print them. Compared
# as torch.optim.AdamW compares (``0.0 <= x``), so that what cannot be compared with a float raises
# torch's TypeError, with its words.
_RANGES = {
    ">= 0": lambda x: 0.0 <= x,
    "in [0, 1)": lambda x: 0.0 <= x < 1.0,
    "in (0, 1]": lambda x: 0.0 < x <= 1.0,
}

# torch.optim.AdamW's words for its values out of range.
_TORCH_INVALID = {
    "lr": "Invalid learning rate",
    "eps": "Invalid epsilon value",
    "weight_decay": "Invalid weight_decay value",
    "betas[0]": "Invalid beta parameter at index 0",
    "betas[1]": "Invalid beta parameter at index 1",
}


def _plain(value: numbers.Real) -> int | float:
    # The same value as a Python int or float (NumPy scalars, bools): what the paths compute with.
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _check_number(name: str, value, allowed: str) -> int | float:
    # selopt's own numbers.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number {allowed}, got {type(value).__name__}")
    if not _RANGES[allowed](value):  # NaN fails every comparison, so it is refused too
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return _plain(value)


def _number(allowed: str) -> Callable:
    return lambda name, value, options: _check_number(name, value, allowed)


def _check_tensor(name: str, value: Tensor, options: AdamWOptions) -> None:
    # torch.optim.AdamW's rules for a hyper-parameter given as a tensor, in its order, with its exception
    # types and words, so that a configuration is valid for both optimizers or for neither. (The foreach
    # rule, for lr and betas, is a limit of torch's foreach implementation; selopt keeps it so that
    # switching back to torch cannot break.)
    if name == "lr" and options.foreach and not options.capturable:
        raise ValueError(
            "lr as a Tensor is not supported for capturable=False and foreach=True (as in torch.optim.AdamW)")
    if value.numel() != 1:
        if name == "lr":
            raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(value.shape)}")
        # torch compares the tensor with its range before it counts the elements, which raises this.
        raise RuntimeError(f"Boolean value of Tensor with more than one value is ambiguous: Tensor {name} must be "
                           f"1-element, got shape {tuple(value.shape)}")
    if value.is_complex():
        try:
            value.ge(0)  # torch's comparison, not implemented for complex tensors: its exception and words
        except RuntimeError as error:
            raise type(error)(f"{error} ({name} must be real, got {value.dtype})") from None
        raise TypeError(f"{name} must be real, got {value.dtype}")
    if name != "lr" and options.capturable and value.device.type != "cpu":
        raise ValueError(
            f"{name} is a tensor on {value.device}: selopt reads it on the host each step, which a captured "
            f"graph cannot do; with capturable=True give {name} as a number or a CPU tensor"
        )


def _compared(name: str, value, options: AdamWOptions, allowed: str):
    """``value``'s number (a tensor's read on the host), compared with its range as torch.optim.AdamW does."""
    number = value
    if isinstance(value, Tensor):
        _check_tensor(name, value, options)
        number = value.item()
    try:
        in_range = _RANGES[allowed](number)
    except TypeError as error:  # torch's own error for what cannot be compared with a float
        raise TypeError(f"{error} ({name} must be a real number {allowed} or a one-element tensor, "
                        f"got {type(value).__name__})") from None
    if not in_range:  # NaN fails every comparison, so it is refused too
        raise ValueError(f"{_TORCH_INVALID[name]}: {value} ({name} must be {allowed})")
    return number


def _real(name: str, number, value) -> int | float:
    # torch takes whatever compares with a float (a Decimal, a NumPy bool or array) and may fail in the step.
    if not isinstance(number, numbers.Real):
        raise TypeError(f"{name} must be a real number or a one-element tensor, got {type(value).__name__}")
    return _plain(number)


def _torch_number(name: str, value, options: AdamWOptions) -> int | float:
    # eps and weight_decay: numbers >= 0, or one-element tensors read on the host (at every step).
    return _real(name, _compared(name, value, options, ">= 0"), value)


# torch.optim.AdamW reads its flags by their truth, so it also takes 0, 1 and None (as False). selopt takes
# those too, but refuses other values rather than guess (amsgrad="no" is true to torch).
_NONE_REFUSED = object()


def _flag_of(none) -> Callable:
    def check(name: str, value, options) -> bool | None:
        if value is None and none is not _NONE_REFUSED:
            return none
        if isinstance(value, numbers.Integral) and value in (0, 1):  # bool, int, NumPy integers
            return bool(value)
        allowed = "None, True or False" if none is None else "a bool" if none is _NONE_REFUSED else (
            "a bool (or 0, 1, or None for False, as torch.optim.AdamW takes them)")
        raise TypeError(f"{name} must be {allowed}, got {value!r}")
    return check


_flag = _flag_of(_NONE_REFUSED)  # selopt's own
_torch_flag = _flag_of(False)
_optional_flag = _flag_of(None)  # foreach and fused: None (torch chooses), True or False


def _one_of(choices: tuple) -> Callable:
    def check(name: str, value, options):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        return value
    return check


def _lr(name: str, lr, options: AdamWOptions) -> int | float | Tensor:
    # A tensor lr stays the tensor: the paths read it at each step, so it may be changed in place. A CPU
    # one is read here too (at each step: see `of`), which syncs nothing; a device one is not read back,
    # as that would sync the host (the kernels read it on the device).
    if isinstance(lr, Tensor) and lr.device.type != "cpu":
        _check_tensor(name, lr, options)
        return lr
    number = _compared(name, lr, options, ">= 0")
    if isinstance(lr, Tensor):
        # What `of` compares: a new value read from the same tensor makes new options, so that launches
        # prepared with the old value read on the host (for params on another device) are not replayed.
        options.__dict__["_lr_read"] = number
        return lr
    return _real(name, number, lr)


def _betas(name: str, betas, options: AdamWOptions) -> tuple:
    try:  # indexed as torch.optim.AdamW indexes it: its IndexError or TypeError for what is not a pair
        pair = betas[0], betas[1]
    except (IndexError, TypeError) as error:
        raise type(error)(f"{error} (betas must be a pair (beta1, beta2), got {betas!r})") from None
    if len(betas) != 2:  # torch takes it, and fails in the step unpacking it
        raise ValueError(f"too many values to unpack (expected 2) (betas must be a pair (beta1, beta2), got {betas!r})")
    values = [_compared(f"betas[{i}]", beta, options, "in [0, 1)") for i, beta in enumerate(pair)]
    # torch wants two floats or two tensors; selopt also takes other real numbers (ints, NumPy floats).
    tensors = [isinstance(beta, Tensor) for beta in pair]
    if tensors[0] != tensors[1] or not any(tensors) and any(
            isinstance(beta, bool) or not isinstance(beta, numbers.Real) for beta in pair):
        raise ValueError(f"betas must be either both floats or both Tensors (as in torch.optim.AdamW; selopt also "
                         f"takes two real numbers), got {betas!r}")
    if tensors[0] and options.foreach and not options.capturable:
        raise ValueError("betas[0] as a Tensor is not supported for capturable=False and foreach=True "
                         "(as in torch.optim.AdamW)")
    # One-element tensors are read on the host, here and at each step (see `of`).
    return tuple(map(_plain, values))


def _decoupled(name: str, value, options) -> bool:
    if value is not True:
        raise ValueError(f"{name} must be True (selopt's weight decay is AdamW's, decoupled), got {value!r}")
    return value


def _block_size(name: str, value, options) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0 or value & (value - 1):
        raise ValueError(f"{name} must be None (one block per tensor) or a positive power of two, got {value!r}")
    return int(value)


def _volatile(given: dict) -> frozenset:
    """The options whose value can change with no change to the group (a tensor, a list): read at every step."""
    names = {name for name in ("eps", "weight_decay") if isinstance(given[name], Tensor)}
    if isinstance(given["lr"], Tensor) and given["lr"].device.type == "cpu":
        names.add("lr")
    betas = given["betas"]
    if not isinstance(betas, tuple) or any(isinstance(beta, Tensor) for beta in betas):
        names.add("betas")
    return frozenset(names)


def _same(a, b) -> bool:
    return a is b or not isinstance(a, Tensor) and not isinstance(b, Tensor) and type(a) is type(b) and a == b


def _option(default: Any, check: Callable) -> Any:
    return field(default=default, metadata={"check": check})


@dataclass(frozen=True)
class AdamWOptions:
    """One param group's hyper-parameters, checked: torch.optim.AdamW's, then selopt's.

    Construction validates every value and raises naming the option; where
    torch.optim.AdamW refuses a value too, with torch's exception type and
    its words first. See :class:`selopt.AdamW` for what each one means.

    The fields hold the values as the paths compute with them: Python ints
    and floats for numbers given as NumPy scalars, bools or one-element
    tensors (a tensor ``lr`` stays the tensor), bools for flags given as 0, 1
    or None. A param group keeps the values as given, as torch's does.

    >>> options = AdamWOptions(lr=1e-4, fraction=0.15)
    >>> options.beta1, options.path
    (0.9, 'exact')
    >>> AdamWOptions(fraction=0)
    Traceback (most recent call last):
    ...
    ValueError: fraction must be in (0, 1], got 0
    """

    lr: float | Tensor = _option(1e-3, _lr)
    betas: tuple = _option((0.9, 0.999), _betas)
    eps: float = _option(1e-8, _torch_number)
    weight_decay: float = _option(1e-2, _torch_number)
    amsgrad: bool = _option(False, _torch_flag)
    maximize: bool = _option(False, _torch_flag)
    foreach: bool | None = _option(None, _optional_flag)
    capturable: bool = _option(False, _torch_flag)
    differentiable: bool = _option(False, _torch_flag)  # True is refused in _check, where fused is known
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
        # The values as given (a param group holds them) are what `of` compares them with.
        self.__dict__["_values"] = tuple(getattr(self, name) for name in NAMES)
        self._check(NAMES)

    def _check(self, names) -> None:
        # Checks the given values of `names`; each field then holds its value as the paths read it.
        # Flags first: the number checks read foreach and capturable.
        given = dict(zip(NAMES, self._values))
        for name in sorted(names, key=lambda name: name not in _FLAGS):
            object.__setattr__(self, name, _CHECKS[name](name, given[name], self))
        if self.differentiable:
            if self.fused:
                raise RuntimeError("`fused` does not support `differentiable` (as in torch.optim.AdamW)")
            # NotImplementedError is a RuntimeError: torch's type when it refuses differentiable=True with fused=True.
            raise NotImplementedError(
                "differentiable=True is not supported: selopt's step runs under torch.no_grad and updates in place; "
                "use differentiable=False (the default)"
            )
        if self.foreach and self.fused:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together. (as in torch.optim.AdamW)")
        if self.moment_dtype == EIGHT_BIT:
            self._check_8bit()
        self.__dict__["_volatile"] = _volatile(given)

    def _check_8bit(self) -> None:
        if self.amsgrad:
            raise ValueError("moment_dtype='8bit' does not keep amsgrad's max_exp_avg_sq: use amsgrad=False, or "
                             "moment_dtype None, torch.float32 or torch.bfloat16 with amsgrad=True")
        if self.block_size is not None and self.block_size < QUANT_BLOCK:
            raise ValueError(f"block_size must be None or at least {QUANT_BLOCK} with moment_dtype='8bit' (a selection "
                             f"block holds whole blocks of the 8-bit state), got {self.block_size}")

    @classmethod
    def from_group(cls, group: dict) -> AdamWOptions:
        """Validate a param group (every option key present)."""
        return cls(**{name: group[name] for name in NAMES})

    def of(self, group: dict) -> AdamWOptions:
        """``group``'s options now, given that ``self`` was validated from it: only changed values are checked.

        Values that can change while the group does not (a CPU tensor ``lr``,
        tensor ``betas``, ``eps`` or ``weight_decay``, a list of betas) are
        read and checked again on every call, so that a value set in place is
        refused before the step changes anything.

        >>> group = {name: getattr(AdamWOptions(), name) for name in NAMES}
        >>> options = AdamWOptions.from_group(group)
        >>> group["lr"] = 5e-4  # a scheduler
        >>> options.of(group).lr
        0.0005
        """
        values = operator.itemgetter(*NAMES)(group)
        volatile = self.__dict__["_volatile"]
        if not volatile and all(map(operator.is_, values, self._values)):
            return self
        changed = {name for name, value, old in zip(NAMES, values, self._values) if value is not old}
        options = copy.copy(self)
        options.__dict__["_values"] = values
        # foreach and capturable change what a tensor lr or betas may be: then everything is checked.
        options._check(NAMES if changed & _FLAGS else changed | volatile)
        if not changed and all(_same(getattr(options, name), getattr(self, name)) for name in volatile) and (
                options.__dict__.get("_lr_read") == self.__dict__.get("_lr_read")):
            return self  # what was prepared for self still holds
        return options

    @property
    def _values(self) -> tuple:
        # In the instance's __dict__ (frozen dataclasses allow that): the values as given, which `of` compares.
        return self.__dict__["_values"]

    def differ_only_in_scalars(self, other: AdamWOptions) -> bool:
        """Whether ``other`` steps as ``self`` does but for the step's numbers (lr, betas, eps, weight decay).

        Such options share an implementation and its launch plans; only the
        scalar arguments change (an lr scheduler's steps, say).

        >>> AdamWOptions(lr=1e-3).differ_only_in_scalars(AdamWOptions(lr=5e-4))
        True
        >>> AdamWOptions().differ_only_in_scalars(AdamWOptions(fraction=0.5))
        False
        """
        return all(_same(getattr(self, name), getattr(other, name)) for name in NAMES if name not in _SCALARS)

    def structure(self) -> tuple:
        """What steps as ``self`` does whatever the step's numbers: equal for options that
        :meth:`differ_only_in_scalars`, hashable.

        >>> AdamWOptions(lr=1e-3).structure() == AdamWOptions(lr=5e-4).structure()
        True
        """
        return (isinstance(self.lr, Tensor), *(getattr(self, name) for name in NAMES if name not in _SCALARS))

    def group_defaults(self) -> dict:
        """The options as torch.optim.AdamW stores them, the keys of a param group: as given, but ``betas``
        a tuple whose one-element tensors are 0-d, as torch keeps them.

        >>> AdamWOptions(betas=[torch.tensor([0.9]), torch.tensor([0.99])]).group_defaults()["betas"]
        (tensor(0.9000), tensor(0.9900))
        """
        defaults = dict(zip(NAMES, self._values))
        defaults["betas"] = tuple(beta.squeeze() if isinstance(beta, Tensor) and beta.dim() else beta
                                  for beta in defaults["betas"])
        return defaults

    @property
    def beta1(self) -> float:
        """``betas[0]`` as a Python number (one-element tensor betas are read on the host, at each step)."""
        return self.betas[0]

    @property
    def beta2(self) -> float:
        return self.betas[1]

    @property
    def path(self) -> str:
        """How a step selects, the one place that decides it; every implementation asks here.

        - ``"dense"``: ``fraction == 1``, every entry moves: plain AdamW;
        - ``"one_pass"``: blocks of at most :data:`ONE_PASS_MAX_BLOCK` entries,
          each selected where it is loaded (the kernels' one-pass kernel);
        - ``"exact"``: whole tensors (``block_size=None``, the MoFO paper) or
          larger blocks, selected by a radix select over several passes; with
          ``block_size=None`` a sharded tensor's shards agree on one threshold.

        >>> [AdamWOptions(fraction=f, block_size=b).path for f, b in ((1.0, None), (0.1, 1024), (0.1, None))]
        ['dense', 'one_pass', 'exact']
        """
        if self.fraction >= 1.0:
            return "dense"
        if self.block_size is not None and self.block_size <= ONE_PASS_MAX_BLOCK:
            return "one_pass"
        return "exact"


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
