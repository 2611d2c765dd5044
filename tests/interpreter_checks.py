"""What Triton's interpreter hides from the kernel tests, checked under it (issue 22): hints and program order.

On a GPU the compiler believes ``tl.multiple_of``, ``tl.max_contiguous`` and
``tl.max_constancy`` (a false one means misaligned 128-bit accesses or wrong
masks), and the programs of one launch run concurrently, in any order (a result
that depends on the order is a race). The interpreter ignores hints and runs the
programs one after another, in order, so both kinds of bug pass there unseen.

Loaded as a pytest plugin by the root ``conftest.py``; under ``TRITON_INTERPRET=1``:

- every hint a kernel makes is checked against the values it describes, when it
  is made, for the whole run (:func:`false_hint` says what is checked); a false
  one raises :class:`FalseHint`, which fails the test that launched the kernel;
- :func:`reordered` runs each launch's programs reversed or in a seeded shuffle,
  for tests that compare with the in-order run; the ``program_order`` fixture
  hands it out, and skips the test where there is no interpreter.

A plugin under tests/, not a module of selopt.kernels: it patches Triton's
private interpreter (``triton.runtime.interpreter``), which no user of the
library runs, and a Triton that renames what it patches must fail the test run,
not a user's import. It fails loudly then (:func:`install`), never by checking nothing.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib.util
import os
import random
import sys
from collections.abc import Iterator

import numpy as np
import pytest

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
NO_INTERPRETER = ("these checks patch Triton's interpreter: they need TRITON_INTERPRET=1 (on a GPU the compiler "
                  "takes the hints and the hardware picks the program order)")
HINTS = ("multiple_of", "max_contiguous", "max_constancy")
checked = collections.Counter()  # hints found true this run, by name (the run's summary prints them)


class FalseHint(AssertionError):
    """A ``tl.multiple_of``/``tl.max_contiguous``/``tl.max_constancy`` that the values contradict."""


def _breaks(values: np.ndarray, step: int) -> np.ndarray:
    """Positions ``i`` along the last axis where some row has ``values[i] != values[i - 1] + step``."""
    if values.shape[-1] < 2:
        return np.empty(0, dtype=np.int64)
    steps = np.diff(values, axis=-1).reshape(-1, values.shape[-1] - 1)
    return np.nonzero((steps != step).any(axis=0))[0] + 1


def _runs_problem(values: np.ndarray, promised: int, step: int) -> tuple[int, int, int] | None:
    """(entry, its value, the one before) of the first break inside a run, if any."""
    wrong = [int(i) for i in _breaks(values, step) if i % promised]
    if not wrong:
        return None
    i = wrong[0]
    rows = values.reshape(-1, values.shape[-1])
    row = rows[np.nonzero(rows[:, i] - rows[:, i - 1] != step)[0][0]]
    return i, int(row[i]), int(row[i - 1])


def _multiple_problem(values: np.ndarray, promised: int, step: int) -> tuple[int, int] | None:
    """(value, its run's length) of the first run whose first value is not a multiple, if any."""
    # The runs: the largest power of two dividing the axis length and every break.
    contiguity = int(np.gcd.reduce(np.append(_breaks(values, step), values.shape[-1])))
    contiguity &= -contiguity
    firsts = values[..., ::contiguity].reshape(-1)
    bad = np.nonzero(firsts % promised)[0]
    return (int(firsts[bad[0]]), contiguity) if len(bad) else None


def false_hint(hint: str, values: np.ndarray, promised: list[int], step: int = 1, pointers: bool = False) -> str | None:
    """Why ``tl.<hint>(x, promised)`` is false of ``x``'s integer ``values``; None when it holds.

    Triton's definitions (its AxisInfo analysis, which the hints set), along each axis ``d``, ``p = promised[d]``:

    - ``max_contiguous``: the axis splits into runs of ``p`` entries, starting at
      entries 0, p, 2p, ...; in a run each entry is ``step`` above the one before;
    - ``max_constancy``: the same runs, each of one value;
    - ``multiple_of``: the first entry of each run of contiguous values is a
      multiple of ``p``. The runs are the values' own (the largest power of two
      dividing the axis length and every entry that is not ``step`` above the one
      before), so without contiguity every entry must be a multiple. The
      compiler's runs can only be shorter (analysis and checked hints are sound),
      and its access width is at most a run, so this is the promise it relies on.

    ``pointers``: ``values`` are byte addresses (shown in hex) and ``step`` is the
    element size: contiguity counts elements, ``multiple_of`` bytes. A scalar is one entry.

    Example:
        >>> false_hint("multiple_of", np.array([16, 17, 18, 19]), [16]) is None
        True
        >>> false_hint("multiple_of", np.array([20, 21, 22, 23]), [16])
        '20, the first of a run of 4 contiguous values, is not a multiple of 16'
        >>> false_hint("max_contiguous", np.array([0, 1, 2, 3, 8, 9, 10, 11]), [4]) is None
        True
        >>> false_hint("max_constancy", np.array([5, 5, 5, 6]), [2])
        'entry 3 is 6 after 5, inside the run of 2 from entry 2'
    """
    show = hex if pointers else str
    values = values.reshape(values.shape or (1,)).astype(np.int64)
    for axis, p in enumerate(promised):
        along = np.moveaxis(values, axis, -1)
        if hint == "multiple_of":
            found = _multiple_problem(along, p, step)
            problem = found and (f"{show(found[0])}, the first of a run of {found[1]} contiguous values, "
                                 f"is not a multiple of {p}")
        else:
            found = _runs_problem(along, p, 0 if hint == "max_constancy" else step)
            problem = found and (f"entry {found[0]} is {show(found[1])} after {show(found[2])}, inside the run of "
                                 f"{p} from entry {found[0] - found[0] % p}")
        if problem:
            return f"along axis {axis}: {problem}" if values.ndim > 1 else problem
    return None


def _integer_values(x) -> tuple[np.ndarray, int, bool] | None:
    """``x``'s values as integers, the step between contiguous ones, and whether they are pointers
    (byte addresses); None for what the compiler keeps no hint on (floats)."""
    import triton.language as tl

    if isinstance(x, int):  # a loop's induction variable: a Python int under the interpreter
        return np.array(x), 1, False
    if not isinstance(x, tl.tensor) or not (x.dtype.is_ptr() or x.dtype.is_int()):
        return None
    step = x.dtype.element_ty.primitive_bitwidth // 8 if x.dtype.is_ptr() else 1
    return np.asarray(x.handle.data).reshape([int(n) for n in x.shape]), step, x.dtype.is_ptr()


def _checked(hint: str, interpreted, x, values):
    """The interpreter's stand-in for ``tl.<hint>``, after checking the hint (raises :class:`FalseHint`)."""
    from triton.runtime.interpreter import interpreter_builder

    promised = [int(getattr(v, "value", v)) for v in (values if isinstance(values, (list, tuple)) else [values])]
    found = _integer_values(x)
    # A promise of the wrong length is left to the interpreter's own stand-in, which raises.
    if found is not None and len(promised) == max(1, found[0].ndim):
        problem = false_hint(hint, found[0], promised, step=found[1], pointers=found[2])
        if problem:
            kernel = sys._getframe(1)  # the jitted function that made the hint
            raise FalseHint(f"tl.{hint}(x, {promised}) is false in {kernel.f_code.co_name} "
                            f"({kernel.f_code.co_filename}:{kernel.f_lineno}), program "
                            f"{interpreter_builder.grid_idx}: {problem}")
        checked[hint] += 1
    return interpreted(x, values)


def _checking_hints(patch_lang_core):
    """The interpreter's ``_patch_lang_core`` (run at each launch), with the hints wrapped in checks."""

    @functools.wraps(patch_lang_core)
    def patch(lang, scope):
        patch_lang_core(lang, scope)
        for hint in HINTS:
            # Through the launch's scope, which puts Triton's own hint back after the launch.
            scope.set_attr(lang, hint, functools.partial(_checked, hint, getattr(lang, hint)))

    patch.checks_hints = True
    return patch


def install() -> None:
    """Check every hint the interpreter meets from now on; raise if its internals are not the ones patched here.

    Example (what ``pytest_configure`` does under ``TRITON_INTERPRET=1``)::

        install()  # then a kernel's false tl.multiple_of raises FalseHint
    """
    import triton
    from triton.runtime import interpreter

    builder = getattr(interpreter, "interpreter_builder", None)
    if not (hasattr(interpreter, "_patch_lang_core") and hasattr(builder, "set_grid_idx")
            and hasattr(builder, "set_grid_dim")):
        raise RuntimeError(f"Triton {triton.__version__}'s interpreter lacks _patch_lang_core or "
                           "interpreter_builder.set_grid_idx/set_grid_dim: update tests/interpreter_checks.py")
    if not getattr(interpreter._patch_lang_core, "checks_hints", False):
        interpreter._patch_lang_core = _checking_hints(interpreter._patch_lang_core)


@contextlib.contextmanager
def reordered(order: str | int) -> Iterator[None]:
    """Run each launch's programs ``"reversed"``, or shuffled by the seed ``order`` (a new shuffle per launch).

    The interpreter's grid loop visits the programs in row-major order and calls
    ``interpreter_builder.set_grid_idx`` before each; this maps the n-th call of a
    launch to the n-th program of the new order. A call out of that pattern (a
    Triton whose loop changed) raises rather than reorder nothing.

    Example::

        with reordered("reversed"):
            kernel[(4,)](out)  # runs programs 3, 2, 1, 0
    """
    if not INTERPRETING:
        raise RuntimeError(NO_INTERPRETER)
    from triton.runtime.interpreter import interpreter_builder as builder

    set_grid_idx, shuffle = builder.set_grid_idx, random.Random(order).shuffle
    launch = {"order": [], "next": 0}

    def set_reordered_grid_idx(x, y, z):
        _, ny, nz = builder.grid_dim
        n = (x * ny + y) * nz + z
        if n == 0:
            launch["order"], launch["next"] = list(range(int(np.prod(builder.grid_dim))))[::-1], 0
            if order != "reversed":
                shuffle(launch["order"])
        if n != launch["next"]:
            raise RuntimeError(f"the interpreter visited program {(x, y, z)} out of row-major order: "
                               "its grid loop changed, update tests/interpreter_checks.py")
        launch["next"] += 1
        program = launch["order"][n]
        set_grid_idx(program // (ny * nz), program // nz % ny, program % nz)

    builder.set_grid_idx = set_reordered_grid_idx  # on the instance: the class's method is untouched
    try:
        yield
    finally:
        del builder.set_grid_idx


@pytest.fixture
def program_order():
    """:func:`reordered`, for a test that compares launches run out of order; skips without the interpreter."""
    if not INTERPRETING:
        pytest.skip(NO_INTERPRETER)
    return reordered


def pytest_configure(config):
    if INTERPRETING and importlib.util.find_spec("triton") is not None:
        install()


def pytest_terminal_summary(terminalreporter):
    if INTERPRETING:
        terminalreporter.write_line(f"interpreter hint checks: held {sum(checked.values())} times {dict(checked)}")
