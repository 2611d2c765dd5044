"""``selopt.AdamW`` and ``selopt.MoFO``: drop-in replacements for ``torch.optim.AdamW``.

The classes only gather tensors, keep torch's state layout and dispatch; the
math is :func:`selopt.reference.adamw_math` (``backend="torch"``) or the fused
Triton kernels in :mod:`selopt.kernels` (``backend="triton"``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import os
import re
import warnings
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import Tensor

from selopt import distributed, reference
from selopt.stats import UpdateStats, UpdateTracker

BACKENDS = ("auto", "triton", "torch")
MOMENT_DTYPES = (None, torch.float32, torch.bfloat16)
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

# The ranges a numeric hyper-parameter may take, spelled as the error messages print them.
_RANGES = {
    ">= 0": lambda x: x >= 0,
    "in [0, 1)": lambda x: 0 <= x < 1,
    "in (0, 1]": lambda x: 0 < x <= 1,
}


def _check_number(name: str, value, allowed: str) -> None:
    """Refuse ``value`` unless it is a real number in the range ``allowed`` (a key of ``_RANGES``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number {allowed}, got {type(value).__name__}")
    if not _RANGES[allowed](value):  # NaN fails every comparison, so it is refused too
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _check_tensor_hyperparameter(name: str, value: Tensor, *, foreach: bool | None, capturable: bool) -> None:
    # torch.optim.AdamW's rules for lr and betas given as tensors, with its exception types, so that a
    # configuration is valid for both optimizers or for neither. (The foreach rule is a limit of
    # torch's foreach implementation; selopt keeps it so that switching back to torch cannot break.)
    if value.numel() != 1:
        raise ValueError(f"{name} as a tensor must have exactly one element, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} as a tensor must be floating-point, got {value.dtype}")
    if foreach and not capturable:
        raise ValueError(f"{name} as a tensor needs capturable=True when foreach=True (as in torch.optim.AdamW)")


def _check_options(options: dict) -> None:
    """Validate every hyper-parameter of a param group; raises before any state changes.

    Where ``torch.optim.AdamW`` refuses a value, the exception type is torch's.
    """
    for flag in ("amsgrad", "maximize", "capturable", "differentiable", "stochastic_rounding"):
        if not isinstance(options[flag], bool):
            raise TypeError(f"{flag} must be a bool, got {options[flag]!r}")
    for flag in ("foreach", "fused"):
        if options[flag] is not None and not isinstance(options[flag], bool):
            raise TypeError(f"{flag} must be None, True or False, got {options[flag]!r}")
    if options["differentiable"]:
        # NotImplementedError is a RuntimeError: torch's type when it refuses differentiable=True with fused=True.
        raise NotImplementedError(
            "differentiable=True is not supported: selopt's step runs under torch.no_grad and updates in place; "
            "use differentiable=False (the default)"
        )
    if options["foreach"] and options["fused"]:
        raise RuntimeError("foreach=True and fused=True cannot be set together (as in torch.optim.AdamW)")
    if options["decoupled_weight_decay"] is not True:
        raise ValueError(
            f"decoupled_weight_decay must be True (selopt's weight decay is AdamW's, decoupled), "
            f"got {options['decoupled_weight_decay']!r}"
        )
    foreach, capturable = options["foreach"], options["capturable"]

    lr = options["lr"]
    if isinstance(lr, Tensor):
        _check_tensor_hyperparameter("lr", lr, foreach=foreach, capturable=capturable)
        if lr.device.type == "cpu":  # a device lr is not read back: that would sync the host
            _check_number("lr", lr.item(), ">= 0")
    else:
        _check_number("lr", lr, ">= 0")

    betas = options["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
        raise ValueError(f"betas must be both numbers or both tensors (as in torch.optim.AdamW), got {betas!r}")
    for i, beta in enumerate(betas):
        name = f"betas[{i}]"
        if isinstance(beta, Tensor):
            _check_tensor_hyperparameter(name, beta, foreach=foreach, capturable=capturable)
            if capturable and beta.device.type != "cpu":
                raise ValueError(
                    f"{name} is a tensor on {beta.device}: selopt reads betas on the host each step, which a "
                    f"captured graph cannot do; with capturable=True give betas as numbers or CPU tensors"
                )
            beta = beta.item()
        _check_number(name, beta, "in [0, 1)")

    _check_number("eps", options["eps"], ">= 0")
    _check_number("weight_decay", options["weight_decay"], ">= 0")
    _check_number("fraction", options["fraction"], "in (0, 1]")
    block_size = options["block_size"]
    if block_size is not None and (
        isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0 or block_size & (block_size - 1)
    ):
        raise ValueError(f"block_size must be None (one block per tensor) or a positive power of two, got {block_size!r}")
    for name, allowed in (
        ("decay", reference.DECAY_MODES),
        ("soft_mask_mode", reference.SOFT_MASK_MODES),
        ("backend", BACKENDS),
    ):
        if options[name] not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {options[name]!r}")
    if options["moment_dtype"] not in MOMENT_DTYPES:
        raise ValueError(f"moment_dtype must be one of {MOMENT_DTYPES}, got {options['moment_dtype']!r}")


def _check_param(param: Tensor, options: dict) -> None:
    """Refuse a parameter the step cannot update under ``options``."""
    if not (param.is_floating_point() or param.is_complex()):
        raise TypeError(f"params must be floating-point or complex tensors, got one of dtype {param.dtype}")
    if param.is_complex() and options["moment_dtype"] == torch.bfloat16:
        raise ValueError(
            "moment_dtype=torch.bfloat16 has no complex counterpart: "
            "complex params need moment_dtype None or torch.float32"
        )


def moment_dtype(param_dtype: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    """Dtype of a parameter's moments: fp32 for low-precision params unless another is requested.

    A complex param has complex moments, as in ``torch.optim.AdamW``, whose real
    view has the dtype a real param of its real view would get.

    >>> moment_dtype(torch.bfloat16, None), moment_dtype(torch.complex64, torch.float32)
    (torch.float32, torch.complex64)
    """
    if param_dtype.is_complex:
        return moment_dtype(param_dtype.to_real(), requested).to_complex()
    if requested is not None:
        return requested
    return param_dtype if param_dtype in (torch.float32, torch.float64) else torch.float32


def _step_hyperparameters(group: dict) -> dict:
    """``group`` as the backends read it: betas as Python numbers.

    The kernels and the reference take betas as numbers; a group may hold them as
    one-element tensors (as torch allows), which are read here, on the host.
    """
    betas = group["betas"]
    if not isinstance(betas[0], Tensor):
        return group
    return {**group, "betas": tuple(beta.item() for beta in betas)}


MIN_TRITON = (3, 6)  # the oldest Triton whose compile selopt's CI checks (torch 2.11's on CUDA)


@functools.cache
def triton_problem() -> str | None:
    """Why selopt's Triton kernels cannot run in this environment, or None when they can."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed: `pip install triton` (or `pip install 'selopt[triton]'`)"
    try:
        import triton

        from selopt import kernels  # noqa: F401 - import errors of the kernels themselves count too
    except Exception as error:  # noqa: BLE001 - a broken install must not break the optimizer
        return f"importing the Triton kernels failed with {type(error).__name__}: {error}"
    version = tuple(int(part) for part in re.findall(r"\d+", triton.__version__)[:2])
    if version < MIN_TRITON:
        return f"Triton {triton.__version__} is older than {'.'.join(map(str, MIN_TRITON))}, the oldest selopt supports"
    return None


def _resolve_backend(requested: str, device: torch.device) -> str:
    if requested == "torch" or (requested == "auto" and device.type != "cuda"):
        return "torch"
    problem = triton_problem()
    if requested == "auto":
        if problem is not None:
            _warn_fallback(f"selopt runs its torch reference instead of the Triton kernels: {problem}")
            return "torch"
        return "triton"
    if problem is not None:
        raise ImportError(f"backend='triton' cannot run: {problem}. Or use backend='auto' to fall back to "
                          "the torch reference")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' on CPU tensors runs only under Triton's interpreter: "
            "set TRITON_INTERPRET=1 before importing triton, or use backend='torch'"
        )
    return "triton"


_fallback_warnings: set[str] = set()


def _warn_fallback(message: str) -> None:
    """Warn once per process and message: the fallback holds for every later step too."""
    if message not in _fallback_warnings:
        _fallback_warnings.add(message)
        warnings.warn(f"{message}. Please report this to the selopt maintainers with the output of "
                      "`python -m selopt.check`.", RuntimeWarning, stacklevel=4)


class AdamW(torch.optim.Optimizer):
    """AdamW that moves, each step, only the entries of each block with the largest momentum.

    With ``fraction=1`` (the default) this is ``torch.optim.AdamW``; below 1 it is
    MoFO (see :class:`MoFO`). The signature is ``torch.optim.AdamW``'s, followed
    by selopt's keywords; every keyword is also a param-group key.

    Args:
        params: parameters, named parameters or param groups, as for any ``torch.optim`` optimizer.
        lr, betas, eps, weight_decay, amsgrad, maximize: as ``torch.optim.AdamW``.
            ``lr`` may be a one-element tensor (the Triton backend reads it on the
            device); ``betas`` may be one-element tensors, read on the host at each step.
        foreach, fused: accepted for compatibility and kept in the param groups,
            without effect: on CUDA the Triton step is already one fused launch per
            bucket of tensors (what ``fused=True`` asks for), elsewhere the torch
            reference runs. As in torch, they cannot both be True.
        capturable: the Triton step never reads the step count or lr on the host,
            so it can be captured in a CUDA graph whatever this flag says. With
            ``capturable=True``, a CUDA param that would step on the torch reference
            (``backend="torch"``, a DTensor) is refused instead of failing the capture.
        differentiable: must be False: the step runs under ``torch.no_grad``.
        fraction: share of each block that moves per step, in (0, 1].
        block_size: None for one block per tensor (the MoFO paper), else a power
            of two: contiguous runs of the flattened tensor.
        decay: ``"all"`` decays every entry (torch AdamW, official MoFO);
            ``"selected"`` only the entries that move.
        soft_mask_mode: how a soft mask from :meth:`set_soft_mask` acts:
            ``"update"`` scales the step (default), ``"grad"`` the gradient.
            Under Adam a constant gradient factor cancels between ``m`` and
            ``sqrt(v)`` except through ``eps``, so ``"grad"`` barely acts.
        moment_dtype: None (fp32 for bf16/fp16 params, else the param dtype),
            ``torch.float32`` or ``torch.bfloat16``.
        stochastic_rounding: round bf16 params stochastically on store.
        backend: ``"auto"`` (Triton for CUDA tensors when it imports, else
            torch), ``"triton"`` or ``"torch"``.

    Complex parameters step as their real view (``torch.view_as_real``), as in
    ``torch.optim.AdamW``: the real and the imaginary part of an entry are two
    entries for selection too, ranked by their own ``|m|``, and a block of
    ``block_size`` counts real components, so the kernels run unchanged.
    (Ranking by the complex ``|m|`` would move whole entries, at the cost of a
    second selection in every kernel.) Their moments are complex tensors, as
    torch stores them, so state dicts stay interchangeable.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = AdamW(model.parameters(), lr=1e-3, fraction=0.5)
        >>> model(torch.randn(3, 4)).sum().backward()
        >>> opt.step(); opt.zero_grad()
    """

    # GradScaler hands grad_scale and found_inf over as attributes instead of
    # unscaling the gradients itself: one pass less, and no host sync.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        fraction: float = 1.0,
        block_size: int | None = None,
        decay: str = "all",
        soft_mask_mode: str = "update",
        moment_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        backend: str = "auto",
    ):
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
            # Not an argument, but a group key of torch.optim.AdamW (always True there): with it,
            # selopt's groups carry every key torch's do, and state dicts round-trip unchanged.
            decoupled_weight_decay=True,
            fraction=fraction, block_size=block_size, decay=decay, soft_mask_mode=soft_mask_mode,
            moment_dtype=moment_dtype, stochastic_rounding=stochastic_rounding, backend=backend,
        )
        _check_options(defaults)
        # As torch.optim.AdamW: one-element tensor betas are kept as 0-d tensors.
        defaults["betas"] = tuple(beta.squeeze() if isinstance(beta, Tensor) and beta.dim() else beta for beta in betas)
        self._soft_masks: dict[Tensor, Tensor] = {}
        self._update_tracker: UpdateTracker | None = None  # see track_updates
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        options = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        _check_options(options)
        params = param_group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif not isinstance(params, set):  # torch refuses sets itself, with its own message
            # A generator (model.parameters()) can be read only once: keep the list for torch.
            params = param_group["params"] = list(params)
        for p in params:
            # (name, tensor) pairs are named parameters; torch refuses anything else that is not a tensor.
            tensor = p[1] if isinstance(p, tuple) else p
            if isinstance(tensor, Tensor):
                _check_param(tensor, options)
        super().add_param_group(param_group)

    def _complete_group(self, group: dict) -> None:
        # Groups saved by torch.optim.AdamW or an older selopt lack some keys: they get this
        # optimizer's defaults, and nothing else is added, so a state dict round-trips unchanged.
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        # As torch.optim.AdamW on load: a torch.optim.Adam checkpoint loads as AdamW.
        group["decoupled_weight_decay"] = True

    def __getstate__(self) -> dict:
        # Soft masks are keyed by param: deepcopy maps them to the copied params along with the state.
        return {**super().__getstate__(), "_soft_masks": self._soft_masks}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            self._complete_group(group)
        self.__dict__.setdefault("_soft_masks", {})
        self.__dict__.setdefault("_update_tracker", None)  # tracking is not state: a copy does not track

    def set_soft_mask(self, param: Tensor, mask: Tensor | None) -> None:
        """Scale ``param``'s updates (or gradients) by ``mask`` in [0, 1]; None removes it.

        ``mask`` has shape ``(param.shape[0],)`` (one factor per output row, as
        CoFiTune's unit masks) or ``param.shape``. The group's ``soft_mask_mode``
        chooses whether it scales the update or the gradient. Masks are saved
        by :meth:`state_dict` (as the per-parameter state entry ``"soft_mask"``)
        and restored by :meth:`load_state_dict`; ``copy.deepcopy`` and
        ``pickle`` keep them too.

        >>> layer = torch.nn.Linear(3, 2)
        >>> opt = AdamW(layer.parameters())
        >>> opt.set_soft_mask(layer.weight, torch.tensor([1.0, 0.25]))
        >>> opt.state_dict()["state"][0]["soft_mask"]
        tensor([1.0000, 0.2500])
        """
        if not any(param is p for group in self.param_groups for p in group["params"]):
            raise ValueError("param is not in this optimizer's param groups")
        if mask is None:
            self._soft_masks.pop(param, None)
            return
        self._soft_masks[param] = _checked_soft_mask(param, mask)

    def state_dict(self) -> dict:
        """``torch.optim.Optimizer.state_dict``, with each soft mask as its parameter's ``"soft_mask"`` entry.

        ``torch.optim.AdamW`` loads such a state dict and keeps the masks as
        state it does not use, except the entry of a parameter that has a mask
        but has not stepped yet, which holds only the mask: torch refuses it
        (``KeyError: 'step'``), and :func:`strip_soft_masks` removes it. The
        masks are added after the state-dict hooks have run.
        """
        state_dict = super().state_dict()
        if self._soft_masks:
            params = (p for group in self.param_groups for p in group["params"])
            index = {id(p): i for i, p in enumerate(params)}  # torch's packing: params numbered across groups
            for param, mask in self._soft_masks.items():
                i = index[id(param)]
                # torch packs the live state dicts: add to a copy.
                state_dict["state"][i] = {**state_dict["state"].get(i, {}), "soft_mask": _given_soft_mask(param, mask)}
        return state_dict

    def track_updates(self, enabled: bool = True, *, per_tensor: bool = False) -> None:
        """Count, from the next step on, what each step moves; read it with :meth:`update_stats`.

        Per param group: the entries the step covered, the entries the update
        moved (MoFO's selection; all of them at ``fraction=1``) and the entries
        weight decay changed (every one with ``decay="all"``, the moved ones with
        ``"selected"``). ``per_tensor=True`` also counts each tensor. Counts stay
        on the device until read, so steps do not synchronise the host; the
        cost while tracking is on is described in :mod:`selopt.stats` (dense
        groups cost nothing). ``enabled=False`` stops tracking and drops the counts.

        >>> model = torch.nn.Linear(10, 10, bias=False)
        >>> opt = MoFO(model.parameters(), lr=1e-3, fraction=0.1)
        >>> opt.track_updates()
        >>> model(torch.randn(2, 10)).sum().backward()
        >>> opt.step()
        >>> print(opt.update_stats())
        last step:
          group 0: moved 10.0% (10 of 100 entries); weight decay changed 100.0% (decay='all': every entry)
        """
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {enabled!r}")
        if not isinstance(per_tensor, bool):
            raise TypeError(f"per_tensor must be a bool, got {per_tensor!r}")
        self._update_tracker = UpdateTracker(per_tensor) if enabled else None

    def update_stats(self) -> UpdateStats | None:
        """What the last step moved (:class:`selopt.stats.UpdateStats`), or None before a tracked step.

        Reads the device counts: one device-to-host copy per device. With sharded
        (DTensor) params it sums the shards' counts with one ``all_reduce`` per
        mesh, so every rank must call it, as every rank calls :meth:`step`.
        """
        if self._update_tracker is None:
            raise RuntimeError("update tracking is off: call track_updates() before the steps to count")
        return self._update_tracker.stats()

    def _init_state(self, param: Tensor, group: dict, backend: str) -> dict:
        state = self.state[param]
        if not state:
            dtype = moment_dtype(param.dtype, group["moment_dtype"])
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"])
        # The kernels read and advance the step on the device (no sync, graph-capturable);
        # the torch backend keeps it on the host as torch's AdamW does.
        step_device = param.device if backend == "triton" else torch.device("cpu")
        if state["step"].device != step_device:
            state["step"] = state["step"].to(step_device)
        return state

    # torch.compile(opt.step) (or a compiled training step) runs the step eagerly: Dynamo would
    # recompile it for every step count the torch reference reads on the host, and the Triton path
    # is a few fused launches already.
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)

        # Check everything first, so that bad input changes nothing.
        plan = []
        for group in self.param_groups:
            _check_options(group)
            by_backend = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("selopt does not support sparse gradients; use torch.optim.SparseAdam for them")
                _check_param(p, group)
                # DTensor (FSDP2 / tensor-parallel) params step their local shards on the torch path.
                if distributed.is_dtensor(p):
                    backend = distributed.sharded_backend(group["backend"])
                else:
                    backend = _resolve_backend(group["backend"], p.device)
                if group["capturable"] and backend != "triton" and p.device.type != "cpu":
                    raise ValueError(
                        f"capturable=True, but a param on {p.device} steps on the torch reference, which reads the "
                        "step count on the host and so cannot be captured; device params step capturably on the "
                        "Triton backend (backend='triton' or 'auto', not for DTensors), or set capturable=False"
                    )
                by_backend[backend].append(p)
            plan.extend((group, backend, params) for backend, params in by_backend.items())

        tracker = self._update_tracker
        if tracker is not None:
            tracker.begin_step(self.param_groups, found_inf)
        # Then prepare every bucket of every group (the kernels' checks and compiles included) before
        # any runs: a kernel that cannot compile for backend="triton" leaves every param untouched.
        with contextlib.ExitStack() as real_views:
            runs = []
            for group, backend, params in plan:
                for p in params:
                    self._init_state(p, group, backend)
                hyperparameters = _step_hyperparameters(group)
                stepped = real_views.enter_context(self._complex_as_real(params))
                if tracker is not None:
                    tracker.expect(group, params, stepped)
                params = stepped
                if backend == "torch":
                    runs.append(functools.partial(self._torch_step, hyperparameters, params, grad_scale, found_inf))
                elif backend == "sharded":
                    runs.append(functools.partial(self._sharded_step, hyperparameters, params, grad_scale, found_inf))
                else:
                    runs += self._prepare_triton_step(hyperparameters, params, grad_scale, found_inf)
            for run in runs:
                run()
        if tracker is not None:
            tracker.end_step()
        return loss

    @contextlib.contextmanager
    def _complex_as_real(self, params: list[Tensor]):
        """``params`` with every complex tensor replaced by its real view, for the length of a step.

        The view gets the real views of the param's grad and moments as its state
        (the step count is shared) and its soft mask, so the backends update the
        complex tensors in place without knowing about them. Nothing is left behind.
        """
        stepped, views = [], []
        for p in params:
            if p.is_complex():
                view = torch.view_as_real(p)
                view.grad = torch.view_as_real(p.grad)
                self.state[view] = {
                    key: torch.view_as_real(value) if isinstance(value, Tensor) and value.is_complex() else value
                    for key, value in self.state[p].items()
                }
                if p in self._soft_masks:
                    self._soft_masks[view] = self._soft_masks[p]  # stored at the real view's shape (set_soft_mask)
                views.append(view)
                p = view
            stepped.append(p)
        try:
            yield stepped
        finally:
            for view in views:
                del self.state[view]
                self._soft_masks.pop(view, None)

    def _torch_step(self, group: dict, params: list[Tensor], grad_scale, found_inf) -> None:
        options = reference.group_options(group)
        tracker = self._update_tracker
        for p in params:
            selected = reference.adamw_step_(
                p, p.grad, self.state[p],
                found_inf=found_inf, stochastic_rounding=group["stochastic_rounding"],
                soft_mask=self._soft_masks.get(p), grad_scale=grad_scale, **options,
            )
            if tracker is not None:
                tracker.record_selection(p, selected)

    def _sharded_step(self, group: dict, params: list[Tensor], grad_scale, found_inf) -> None:
        selections = distributed.sharded_step_(
            group, params, [self.state[p] for p in params], [self._soft_masks.get(p) for p in params],
            grad_scale, found_inf,
        )
        if self._update_tracker is not None:
            for p, selected in zip(params, selections):
                self._update_tracker.record_selection(p, selected)

    def _prepare_triton_step(self, group: dict, params: list[Tensor], grad_scale, found_inf) -> list:
        """One checked, compiled step per bucket (device, param dtype, moment dtype), to be called in order."""
        from selopt import kernels

        # Each param's state is looked up once: hashing a Tensor is a Python call, and with hundreds
        # of tensors these lookups are a visible part of a step's host time.
        buckets, bucket_states = defaultdict(list), defaultdict(list)
        for p in params:
            state = self.state[p]
            key = (p.device, p.dtype, state["exp_avg"].dtype)
            buckets[key].append(p)
            bucket_states[key].append(state)
        runs = []
        for key, bucket in buckets.items():
            _, param_dtype, state_dtype = key
            if param_dtype not in kernels.PARAM_DTYPES or state_dtype not in kernels.MOMENT_DTYPES:
                # fp64 has no kernel: the reference runs it (reading the step back to the host).
                runs.append(functools.partial(self._torch_step, group, bucket, grad_scale, found_inf))
                continue
            try:
                runs.append(self._prepare_kernels(group, bucket, bucket_states[key], grad_scale, found_inf))
            except kernels.KernelCompileError as error:
                if group["backend"] != "auto":
                    raise
                _warn_fallback(f"selopt runs its torch reference for {param_dtype} params with "
                               f"{state_dtype} moments: {error}")
                runs.append(functools.partial(self._torch_step, group, bucket, grad_scale, found_inf))
        return runs

    def _prepare_kernels(self, group: dict, bucket: list[Tensor], states: list[dict], grad_scale, found_inf):
        from selopt import kernels

        beta1, beta2 = group["betas"]
        tracker = self._update_tracker
        return kernels.prepare_multi_tensor_adamw(
            bucket,
            [p.grad for p in bucket],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else None,
            [s["step"] for s in states],
            [self._soft_masks.get(p) for p in bucket] if self._soft_masks else None,
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            maximize=group["maximize"], fraction=group["fraction"], block_size=group["block_size"],
            decay=group["decay"], soft_mask_mode=group["soft_mask_mode"],
            stochastic_rounding=group["stochastic_rounding"], grad_scale=grad_scale, found_inf=found_inf,
            selections=None if tracker is None else tracker.selection_buffers(bucket),
            # torch enforces a grad's shape, dtype and device; selopt makes (and checks on load) the state.
            assume_matching=True,
        )

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a selopt or ``torch.optim.AdamW`` state_dict, checked before anything changes.

        This is ``torch.optim.Optimizer.load_state_dict`` (hooks included), with
        three differences, which is why it does not call it:

        - the state_dict the pre-hooks return is checked in full (group structure,
          options, state entries) before anything changes;
        - moments keep their precision: torch casts every floating-point state
          tensor to its param's dtype, rounding fp32 moments of bf16 params to
          bf16; here they get the param's moment dtype (:func:`moment_dtype`), so
          fp32 moments stay fp32 and bf16 moments saved by torch widen exactly;
        - ``step``, a tensor or a Python number (torch's AdamW loads both), is
          stored as a fp32 tensor, which the kernels read.
        """
        state_dict = state_dict.copy()  # shallow, as torch: a pre-hook may replace its entries
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result

        saved_groups = copy.deepcopy(state_dict["param_groups"])  # completed below
        ours = [len(group["params"]) for group in self.param_groups]
        theirs = [len(group["params"]) for group in saved_groups]
        if ours != theirs:
            raise ValueError(
                f"state_dict's param groups differ from this optimizer's: {len(theirs)} group(s) of {theirs} params "
                f"against {len(ours)} of {ours}. To move it to these groups, load it into an optimizer grouped as it "
                "was saved and copy that optimizer's .state into this one (see the README)"
            )
        targets = {}  # saved param id -> (param, its group as loaded)
        for group, saved in zip(self.param_groups, saved_groups):
            targets.update((i, (p, saved)) for i, p in zip(saved["params"], group["params"]))
            saved["params"] = group["params"]
            if "param_names" in group and "param_names" not in saved:
                saved["param_names"] = group["param_names"]
            self._complete_group(saved)
            _check_options(saved)
            for p in saved["params"]:
                _check_param(p, saved)
        state, masks = defaultdict(dict), {}
        for key, entry in state_dict["state"].items():
            if key in targets:
                param, group = targets[key]
                if "soft_mask" in entry:
                    entry = dict(entry)
                    masks[param] = _loaded_soft_mask(key, entry.pop("soft_mask"), param)
                state[param] = _loaded_state(key, entry, param, group)
            else:
                state[key] = entry  # as torch: state that belongs to no param is kept as it is

        self.__setstate__({"state": state, "param_groups": saved_groups})
        self._soft_masks.update(masks)  # a param whose entry has no mask keeps the one attached to it
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


def _checked_soft_mask(param: Tensor, mask) -> Tensor:
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


def _given_soft_mask(param: Tensor, mask: Tensor) -> Tensor:
    """The mask as :meth:`AdamW.set_soft_mask` took it, from the form the step reads."""
    if param.is_complex() and mask.dim() == param.dim() + 1:
        return mask[..., 0]  # a full-shape mask of a complex param is kept at its real view's shape
    return mask


def _loaded_soft_mask(param_id, mask, param: Tensor) -> Tensor:
    """A saved ``"soft_mask"`` entry for ``param``, checked as :meth:`AdamW.set_soft_mask` checks it."""
    try:
        return _checked_soft_mask(param, mask.to(param.device) if isinstance(mask, Tensor) else mask)
    except (TypeError, ValueError) as error:
        raise type(error)(f"state_dict['state'][{param_id!r}]['soft_mask']: {error}") from None


def strip_soft_masks(state_dict: dict) -> dict:
    """A copy of a selopt ``state_dict`` without its soft masks, for an optimizer that has no use for them.

    ``torch.optim.AdamW`` loads a selopt state dict as it is and ignores the
    masks, except where a parameter has a mask but had not stepped when the
    state dict was saved: its entry holds only the mask, and torch's
    ``load_state_dict`` raises ``KeyError: 'step'``. Stripping drops those
    entries (the parameter then starts fresh, as it would in selopt) and the
    ``"soft_mask"`` key of the others.

    >>> layer = torch.nn.Linear(3, 2)
    >>> opt = AdamW(layer.parameters())
    >>> opt.set_soft_mask(layer.weight, torch.tensor([1.0, 0.25]))
    >>> torch_opt = torch.optim.AdamW(layer.parameters())
    >>> torch_opt.load_state_dict(strip_soft_masks(opt.state_dict()))
    """
    state = {}
    for key, entry in state_dict["state"].items():
        entry = {name: value for name, value in entry.items() if name != "soft_mask"}
        if entry:
            state[key] = entry
    return {**state_dict, "state": state}


def _loaded_state(param_id, entry: dict, param: Tensor, group: dict) -> dict:
    """A saved state entry for ``param`` as selopt keeps it; raises if it does not fit ``param``."""
    where = f"state_dict['state'][{param_id!r}]"
    if not entry:
        return {}
    missing = [key for key in ("step", "exp_avg", "exp_avg_sq") if key not in entry]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}")
    step = entry["step"]
    is_number = isinstance(step, (int, float)) and not isinstance(step, bool)
    if not (is_number or isinstance(step, Tensor) and step.numel() == 1):
        raise ValueError(f"{where}['step'] must be a number or a one-element tensor, got {step!r}")
    dtype = moment_dtype(param.dtype, group["moment_dtype"])
    loaded = dict(entry)  # keys selopt does not use are kept as saved
    for key in _MOMENT_KEYS:
        if key not in entry:
            continue
        value = entry[key]
        if not isinstance(value, Tensor):
            raise ValueError(f"{where}[{key!r}] must be a tensor, got {type(value).__name__}")
        if value.shape != param.shape:
            raise ValueError(
                f"{where}[{key!r}] has shape {tuple(value.shape)}, but its param has shape {tuple(param.shape)}"
            )
        if value.is_complex() != param.is_complex():
            raise ValueError(
                f"{where}[{key!r}] is {value.dtype}, but its param is {param.dtype}: both or neither must be complex"
            )
        loaded[key] = value.to(device=param.device, dtype=dtype)
    # The step moves the count to the device its backend keeps it on (see _init_state).
    loaded["step"] = torch.as_tensor(step, dtype=torch.float32)
    return loaded


class MoFO(AdamW):
    """MoFO (Chen et al., 2025): AdamW that moves only the top ``fraction`` of each block by |momentum|.

    :class:`AdamW`'s signature, with ``fraction=0.15`` and one block per tensor
    (``block_size=None``, the paper's partition) by default.

    Example:
        >>> model = torch.nn.Linear(10, 10, bias=False)
        >>> before = model.weight.detach().clone()
        >>> opt = MoFO(model.parameters(), lr=1e-4, weight_decay=0.0, fraction=0.1)
        >>> model(torch.randn(2, 10)).pow(2).mean().backward()
        >>> opt.step()
        >>> int((model.weight.detach() != before).sum())  # k = floor(0.1 * 100)
        10
    """

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        fraction: float = 0.15,
        block_size: int | None = None,
        decay: str = "all",
        soft_mask_mode: str = "update",
        moment_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        backend: str = "auto",
    ):
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, foreach=foreach,
            capturable=capturable, differentiable=differentiable, fused=fused, fraction=fraction,
            block_size=block_size, decay=decay, soft_mask_mode=soft_mask_mode, moment_dtype=moment_dtype,
            stochastic_rounding=stochastic_rounding, backend=backend,
        )
