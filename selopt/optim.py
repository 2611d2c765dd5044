"""``selopt.AdamW`` and ``selopt.MoFO``: drop-in replacements for ``torch.optim.AdamW``.

The classes only gather tensors, keep torch's state layout and dispatch; the
math is :func:`selopt.reference.adamw_math` (``backend="torch"``) or the fused
Triton kernels in :mod:`selopt.kernels` (``backend="triton"``).
"""

from __future__ import annotations

import importlib.util
import os
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import Tensor

from selopt import distributed, reference

BACKENDS = ("auto", "triton", "torch")
MOMENT_DTYPES = (None, torch.float32, torch.bfloat16)
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _check_number(name: str, value, low: float, high: float | None = None, *, closed_high: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    ok = value >= low and (high is None or (value <= high if closed_high else value < high))
    if not ok:
        interval = f">= {low}" if high is None else f"in [{low}, {high}{']' if closed_high else ')'}"
        raise ValueError(f"{name} must be {interval}, got {value!r}")


def _check_options(options: dict) -> None:
    """Validate every hyper-parameter of a param group; raises before any state changes."""
    lr = options["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise TypeError(f"lr as a tensor must be a single floating-point value, got shape {tuple(lr.shape)}, {lr.dtype}")
        if lr.device.type == "cpu":  # a device lr is not read back: that would sync the host
            _check_number("lr", lr.item(), 0.0)
    else:
        _check_number("lr", lr, 0.0)
    betas = options["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    _check_number("betas[0]", betas[0], 0.0, 1.0)
    _check_number("betas[1]", betas[1], 0.0, 1.0)
    _check_number("eps", options["eps"], 0.0)
    _check_number("weight_decay", options["weight_decay"], 0.0)
    _check_number("fraction", options["fraction"], 0.0, 1.0, closed_high=True)
    if options["fraction"] == 0:
        raise ValueError("fraction must be in (0, 1], got 0")
    for flag in ("amsgrad", "maximize", "stochastic_rounding"):
        if not isinstance(options[flag], bool):
            raise TypeError(f"{flag} must be a bool, got {options[flag]!r}")
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


def moment_dtype(param_dtype: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    """Dtype of a parameter's moments: fp32 for low-precision params unless another is requested."""
    if requested is not None:
        return requested
    return param_dtype if param_dtype in (torch.float32, torch.float64) else torch.float32


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _resolve_backend(requested: str, device: torch.device) -> str:
    if requested == "torch":
        return "torch"
    if requested == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise ImportError(
            "backend='triton' needs Triton: `pip install triton` (or `pip install 'selopt[triton]'`), "
            "or use backend='auto' to fall back to the torch reference"
        )
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' on CPU tensors runs only under Triton's interpreter: "
            "set TRITON_INTERPRET=1 before importing triton, or use backend='torch'"
        )
    return "triton"


class AdamW(torch.optim.Optimizer):
    """AdamW that moves, each step, only the entries of each block with the largest momentum.

    With ``fraction=1`` (the default) this is ``torch.optim.AdamW``; below 1 it is
    MoFO (see :class:`MoFO`). Every keyword is also a param-group key.

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimizer.
        lr, betas, eps, weight_decay, amsgrad, maximize: as ``torch.optim.AdamW``;
            ``lr`` may be a tensor (kept on the device by the Triton backend).
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
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        amsgrad: bool = False,
        maximize: bool = False,
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
            fraction=fraction, block_size=block_size, decay=decay, soft_mask_mode=soft_mask_mode,
            moment_dtype=moment_dtype, stochastic_rounding=stochastic_rounding, backend=backend,
        )
        _check_options(defaults)
        self._soft_masks: dict[Tensor, Tensor] = {}
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
            if isinstance(p, Tensor) and not p.is_floating_point():
                raise TypeError(f"params must be floating-point tensors, got one of dtype {p.dtype}")
        super().add_param_group(param_group)

    def __setstate__(self, state: dict) -> None:
        # A torch.optim.AdamW state_dict lacks selopt's keys: they get the defaults.
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self.__dict__.setdefault("_soft_masks", {})

    def set_soft_mask(self, param: Tensor, mask: Tensor | None) -> None:
        """Scale ``param``'s updates (or gradients) by ``mask`` in [0, 1]; None removes it.

        ``mask`` has shape ``(param.shape[0],)`` (one factor per output row, as
        CoFiTune's unit masks) or ``param.shape``. The group's ``soft_mask_mode``
        chooses whether it scales the update or the gradient. Masks are not part
        of ``state_dict``: attach them again after a load.

        >>> layer = torch.nn.Linear(3, 2)
        >>> opt = AdamW(layer.parameters())
        >>> opt.set_soft_mask(layer.weight, torch.tensor([1.0, 0.25]))
        """
        if not any(param is p for group in self.param_groups for p in group["params"]):
            raise ValueError("param is not in this optimizer's param groups")
        if mask is None:
            self._soft_masks.pop(param, None)
            return
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
        self._soft_masks[param] = mask.detach().to(torch.float32).contiguous()

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
                # DTensor (FSDP2 / tensor-parallel) params step their local shards on the torch path.
                if distributed.is_dtensor(p):
                    backend = distributed.sharded_backend(group["backend"])
                else:
                    backend = _resolve_backend(group["backend"], p.device)
                by_backend[backend].append(p)
            plan.extend((group, backend, params) for backend, params in by_backend.items())

        for group, backend, params in plan:
            for p in params:
                self._init_state(p, group, backend)
            if backend == "torch":
                self._torch_step(group, params, grad_scale, found_inf)
            elif backend == "sharded":
                distributed.sharded_step_(
                    group, params, [self.state[p] for p in params], [self._soft_masks.get(p) for p in params],
                    grad_scale, found_inf,
                )
            else:
                self._triton_step(group, params, grad_scale, found_inf)
        return loss

    def _torch_step(self, group: dict, params: list[Tensor], grad_scale, found_inf) -> None:
        options = reference.group_options(group)
        for p in params:
            reference.adamw_step_(
                p, p.grad, self.state[p],
                found_inf=found_inf, stochastic_rounding=group["stochastic_rounding"],
                soft_mask=self._soft_masks.get(p), grad_scale=grad_scale, **options,
            )

    def _triton_step(self, group: dict, params: list[Tensor], grad_scale, found_inf) -> None:
        from selopt import kernels

        buckets = defaultdict(list)
        for p in params:
            buckets[(p.device, p.dtype, self.state[p]["exp_avg"].dtype)].append(p)
        beta1, beta2 = group["betas"]
        for (_, param_dtype, state_dtype), bucket in buckets.items():
            if param_dtype not in kernels.PARAM_DTYPES or state_dtype not in kernels.MOMENT_DTYPES:
                # fp64 has no kernel: the reference runs it (reading the step back to the host).
                self._torch_step(group, bucket, grad_scale, found_inf)
                continue
            states = [self.state[p] for p in bucket]
            kernels.multi_tensor_adamw_(
                bucket,
                [p.grad for p in bucket],
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else None,
                [s["step"] for s in states],
                [self._soft_masks.get(p) for p in bucket],
                lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                maximize=group["maximize"], fraction=group["fraction"], block_size=group["block_size"],
                decay=group["decay"], soft_mask_mode=group["soft_mask_mode"],
                stochastic_rounding=group["stochastic_rounding"], grad_scale=grad_scale, found_inf=found_inf,
            )

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a selopt or ``torch.optim.AdamW`` state_dict, checked before anything changes.

        Unlike torch's default, moments keep their precision: fp32 moments of
        bf16 params stay fp32 (bf16 moments saved by torch are widened exactly).
        """
        params = [p for group in self.param_groups for p in group["params"]]
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        if len(saved_ids) != len(params):
            raise ValueError(
                f"state_dict has {len(saved_ids)} params in its groups, this optimizer has {len(params)}"
            )
        saved_state = state_dict["state"]
        for param_id, param in zip(saved_ids, params):
            entry = saved_state.get(param_id)
            if not entry:
                continue
            if "step" not in entry or "exp_avg" not in entry or "exp_avg_sq" not in entry:
                raise ValueError(f"state_dict state[{param_id}] lacks step, exp_avg or exp_avg_sq")
            for key in _MOMENT_KEYS:
                if key in entry and tuple(entry[key].shape) != tuple(param.shape):
                    raise ValueError(
                        f"state_dict state[{param_id}][{key!r}] has shape {tuple(entry[key].shape)}, "
                        f"but its param has shape {tuple(param.shape)}"
                    )
        super().load_state_dict(state_dict)
        for param_id, param in zip(saved_ids, params):
            entry = saved_state.get(param_id)
            if not entry:
                continue
            group = next(g for g in self.param_groups if any(param is p for p in g["params"]))
            dtype = moment_dtype(param.dtype, group["moment_dtype"])
            for key in _MOMENT_KEYS:
                if key in entry:
                    self.state[param][key] = entry[key].to(device=param.device, dtype=dtype)
            self.state[param]["step"] = self.state[param]["step"].to(torch.float32)


class MoFO(AdamW):
    """MoFO (Chen et al., 2025): AdamW that moves only the top ``fraction`` of each block by |momentum|.

    Same keywords as :class:`AdamW`, with ``fraction=0.15`` and one block per
    tensor (``block_size=None``, the paper's partition) by default.

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
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        fraction: float = 0.15,
        block_size: int | None = None,
        **options,
    ):
        super().__init__(params, lr, betas, eps, weight_decay, fraction=fraction, block_size=block_size, **options)
