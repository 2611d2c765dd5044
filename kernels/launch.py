"""Kernel launches as data: compile every kernel of a step before the first one runs.

A step is a short list of :class:`Launch` records (one for the one-pass
kernel, nine for the exact path). :func:`compile_launches` compiles all of them
before any is launched, so a kernel that cannot compile for this GPU or this
Triton raises :class:`KernelCompileError` while every tensor is still
untouched, and the optimizer can fall back to the reference for that bucket.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import triton
import triton.language as tl
from triton.runtime.jit import JITFunction


# No FMA contraction: the moments then round operation by operation as the reference's formula
# does (torch's lerp and mul/add order is spelled out in device.adam_moments), which keeps the
# kernels' m, and so their selection, within an ulp or two of the reference's. Contraction would
# save instructions in kernels that bench.static predicts to be bound by their bytes anyway.
# Explicit, so that every Triton makes the same choice (newer ones change the default).
_COMPILE_OPTIONS = dict(enable_fp_fusion=False)


@triton.jit
def _probe():
    pass


# Whether @triton.jit made the interpreter's stand-ins (TRITON_INTERPRET=1 when the kernels were
# defined): then there is nothing to compile, and the interpreter runs the Python source.
INTERPRETED = not isinstance(_probe, JITFunction)


class KernelCompileError(RuntimeError):
    """A selopt kernel failed to compile; raised before any tensor of the step was written.

    ``kernel``, ``config`` (its constexprs), ``target`` and ``error`` (the
    innermost compiler error) are kept as attributes for programs that log them.
    """

    def __init__(self, kernel: str, config: dict, target: Any, error: BaseException):
        self.kernel, self.config, self.target, self.error = kernel, config, target, error
        settings = ", ".join(f"{k}={_show(v)}" for k, v in config.items())
        super().__init__(
            f"selopt kernel {kernel} failed to compile for {_show_target(target)} (Triton {triton.__version__}) "
            f"with {settings}: {_reason(error)}"
        )


def _show(value: Any) -> str:
    return value.name if hasattr(value, "name") else repr(value)


def _show_target(target: Any) -> str:
    return f"{target.backend} sm_{target.arch}" if hasattr(target, "arch") else str(target)


def _reason(error: BaseException) -> str:
    # Triton's CompilationError quotes the kernel source and ends with the cause's repr; keep the
    # position and the cause. Any other error: its type and last line.
    message = getattr(error, "error_message", None)
    if message is not None and hasattr(error, "node"):
        return f"{message} (at line {getattr(error.node, 'lineno', '?')} of the failing @jit function)"
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[-1] if text else ''}"


def _innermost(error: BaseException) -> BaseException:
    # A failure inside a nested @jit function arrives wrapped once per call level.
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    return error


def _argument_key(value: Any) -> Any:
    # What Triton specializes a non-constexpr argument on: None, an integer equal to 1 or
    # divisible by 16, a pointer's dtype and 16-byte alignment.
    if value is None or isinstance(value, (bool, float)):
        return value if value is None else type(value)
    if isinstance(value, int):
        return (value == 1, value % 16 == 0)
    if isinstance(value, Tensor):
        return (value.dtype, value.data_ptr() % 16 == 0)
    return type(value)


@functools.cache
def _parameters(kernel: Any) -> tuple[tuple[str, ...], frozenset[str]]:
    """The kernel's parameter names, in order, and which of them are ``tl.constexpr``."""
    parameters = inspect.signature(kernel.fn).parameters.values()
    constexprs = frozenset(p.name for p in parameters if p.annotation in (tl.constexpr, "tl.constexpr"))
    return tuple(p.name for p in parameters), constexprs


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``kernel[grid](**args, **constexprs, num_warps=num_warps)``."""

    kernel: Any  # a JITFunction (or Triton's interpreter's stand-in for one)
    grid: tuple[int, ...]
    args: dict[str, Any]
    constexprs: dict[str, Any]
    num_warps: int

    @classmethod
    def bind(cls, kernel: Any, grid: tuple[int, ...], values: dict[str, Any], num_warps: int) -> Launch:
        """The launch of ``kernel`` taking each of its parameters, by name, from ``values``.

        ``values`` may hold more than the kernel takes: one record of a step's
        arguments and flags serves every kernel of the step.
        """
        names, constexprs = _parameters(kernel)
        missing = [name for name in names if name not in values]
        if missing:
            raise TypeError(f"no value for {kernel.fn.__name__}'s parameters {missing}")
        return cls(kernel, grid, {n: values[n] for n in names if n not in constexprs},
                   {n: values[n] for n in names if n in constexprs}, num_warps)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def specialization(self) -> tuple:
        """What picks the compiled binary: the kernel, its constexprs and how its arguments specialize."""
        return (self.name, self.num_warps, tuple(self.constexprs.items()),
                tuple(_argument_key(a) for a in self.args.values()))

    def compile(self, target: Any = None) -> Any:
        """Compile without launching (Triton's warmup); failures become :class:`KernelCompileError`."""
        try:
            return self.kernel.run(grid=self.grid, warmup=True, **self.args, **self.constexprs,
                                   num_warps=self.num_warps, **_COMPILE_OPTIONS)
        except Exception as error:  # noqa: BLE001 - any compiler failure, reported with its cause
            raise KernelCompileError(self.name, self.constexprs, target, _innermost(error)) from error

    def __call__(self) -> None:
        self.kernel[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps, **_COMPILE_OPTIONS)


class CompileMemo:
    """Which kernel specializations compiled, per (device, target): each compiles once per process.

    A failure is kept as the facts of :class:`KernelCompileError`, without a
    traceback, and every later launch of that specialization raises a fresh
    error from them: re-raising one stored exception would chain each step's
    frames (and the tensors they hold) onto its traceback, step after step.
    """

    def __init__(self):
        self._failures: dict[tuple, tuple | None] = {}

    def compile(self, launches: list[Launch], device: torch.device, target: Any) -> None:
        """Compile each launch not yet compiled for ``device`` and ``target``; raise the first failure."""
        for launch in launches:
            key = (device, target, launch.specialization())
            if key not in self._failures:
                try:
                    launch.compile(target)
                    self._failures[key] = None
                except KernelCompileError as error:
                    self._failures[key] = (error.kernel, error.config, error.target,
                                           error.error.with_traceback(None))
            failure = self._failures[key]
            if failure is not None:
                raise KernelCompileError(*failure)


# The one per-process memo: compiled binaries are per process too (Triton's own cache).
_memo = CompileMemo()


def compile_launches(steps: list, device: torch.device) -> None:
    """Compile each launch (of ``steps``, which may hold other callables) not yet compiled for this device.

    Raises the first failure, new or remembered. Under ``TRITON_INTERPRET=1``
    there is nothing to compile: the interpreter runs the Python source.
    """
    launches = [step for step in steps if isinstance(step, Launch)]
    if not launches or INTERPRETED:
        return
    _memo.compile(launches, device, triton.runtime.driver.active.get_current_target())
