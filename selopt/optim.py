"""``selopt.AdamW`` and ``selopt.MoFO``: drop-in replacements for ``torch.optim.AdamW``.

The classes gather a param group's tensors into lists, keep torch's state
layout, and hand each bucket of tensors (same device, dtypes and sharding) to
:func:`selopt.functional.prepare_adamw` with the group's validated
:class:`~selopt.options.AdamWOptions` (``docs/design.md`` §4).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import Tensor

from selopt import distributed, functional
from selopt.options import AdamWOptions, optimizer_signature
from selopt.stats import UpdateStats, UpdateTracker

_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _check_param_dtype(dtype: torch.dtype, options: AdamWOptions) -> None:
    """Refuse parameters of ``dtype`` that the step cannot update under ``options``."""
    if not (dtype.is_floating_point or dtype.is_complex):
        raise TypeError(f"params must be floating-point or complex tensors, got one of dtype {dtype}")
    if dtype.is_complex and options.moment_dtype == torch.bfloat16:
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


def _new_rounding_seed() -> Tensor:
    # From torch's generator, so torch.manual_seed makes runs repeatable; saved with the state, so a
    # resumed run rounds as an uninterrupted one.
    return torch.randint(0, 2**62, (), dtype=torch.int64)


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
    __signature__ = optimizer_signature()

    def __init__(self, params: Iterable, *args, **kwargs):
        # One definition of the options (selopt.options): the signature is derived from it.
        bound = type(self).__signature__.bind(params, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        del arguments["params"]
        defaults = AdamWOptions(**arguments).group_defaults()  # betas as torch keeps them: 0-d tensors
        self._soft_masks: dict[Tensor, Tensor] = {}
        self._update_tracker: UpdateTracker | None = None  # see track_updates
        self._reset_caches()
        super().__init__(params, defaults)

    def _reset_caches(self) -> None:
        # Derived from the groups and the state, rebuilt when they are replaced: each group's
        # validated options and last prepared step (by id of the group dict), and each
        # implementation's cache (the kernels' plans).
        self._options: dict[int, AdamWOptions] = {}
        self._replays: dict[int, _Replay] = {}
        self._caches: dict[str, object] = {}

    def _options_of(self, group: dict) -> AdamWOptions:
        """``group``'s options, validated when added; a value changed since (lr by a scheduler) is checked alone."""
        known = self._options.get(id(group))
        options = AdamWOptions.from_group(group) if known is None else known.of(group)
        self._options[id(group)] = options
        return options

    def add_param_group(self, param_group: dict) -> None:
        options = AdamWOptions.from_group({**self.defaults, **param_group})
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
                _check_param_dtype(tensor.dtype, options)
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
        state = {**super().__getstate__(), "_soft_masks": self._soft_masks}
        for derived in ("_options", "_replays", "_caches", "_update_tracker"):
            state.pop(derived, None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            self._complete_group(group)
        self.__dict__.setdefault("_soft_masks", {})
        self._update_tracker = None  # tracking is not state: a copy does not track
        self._reset_caches()

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
        self._replays.clear()  # a replayed step would address the old mask
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

    def update_stats(self) -> UpdateStats:
        """What the last tracked step moved (:class:`selopt.stats.UpdateStats`).

        Before the first tracked step every group reports 0 entries and
        ``tracked`` is False. Reads the device counts: one device-to-host copy
        per device. With sharded (DTensor) params it sums the shards' counts
        with one ``all_reduce`` per mesh, so every rank must call it, as every
        rank calls :meth:`step`.
        """
        if self._update_tracker is None:
            raise RuntimeError("update tracking is off: call track_updates() before the steps to count")
        return self._update_tracker.stats(self.param_groups)

    def _init_state(self, param: Tensor, options: AdamWOptions) -> dict:
        state = self.state[param]
        if not state:
            dtype = moment_dtype(param.dtype, options.moment_dtype)
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
        if options.amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"])
        if options.stochastic_rounding and param.dtype == torch.bfloat16 and "rounding_seed" not in state:
            state["rounding_seed"] = _new_rounding_seed().to(state["step"].device)
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
        grad_scale = functional.amp_scalar("grad_scale", getattr(self, "grad_scale", None))
        found_inf = functional.amp_scalar("found_inf", getattr(self, "found_inf", None))

        # Check and choose everything first, so that bad input changes nothing.
        work = []
        for group in self.param_groups:
            options = self._options_of(group)
            replayed = self._replayed_launches(group, options, grad_scale, found_inf)
            if replayed is not None:
                work.append((group, options, (), replayed))
                continue
            params = [p for p in group["params"] if p.grad is not None]
            if len(set(map(id, params))) != len(params):
                # torch warns about a param listed twice in a group and steps it twice; selopt steps it
                # once, since the kernels would update it twice in one launch, racing with themselves.
                params = list({id(p): p for p in params}.values())
            if any([p.grad.is_sparse for p in params]):
                raise RuntimeError("selopt does not support sparse gradients; use torch.optim.SparseAdam for them")
            for dtype in {p.dtype for p in params}:
                _check_param_dtype(dtype, options)
            buckets, fresh = self._buckets(params, options)
            if options.stochastic_rounding or options.soft_mask_mode != "update":
                _warn_idle_options(self, group, options, params)
            buckets = [(functional.choose_implementation(device, dtype, state_dtype, sharded=sharded, options=options),
                        bucket, entries, has_complex)
                       for (device, dtype, state_dtype, sharded, has_complex), bucket, entries in buckets]
            work.append((group, options, fresh, buckets))

        tracker = self._update_tracker
        if tracker is not None:
            tracker.begin_step(self.param_groups, found_inf)
        # Then prepare every bucket of every group (the kernels' checks and compiles included) before
        # any runs: a kernel that cannot compile for backend="triton" leaves every param untouched.
        with contextlib.ExitStack() as real_views:
            runs, made = [], []
            try:
                for group, options, fresh, buckets in work:
                    if isinstance(buckets, _Replayed):
                        runs += [functools.partial(_run_launches, launches) for launches in buckets.launches]
                        continue
                    made += [p for p in fresh if p not in self.state]
                    for p in fresh:
                        self._init_state(p, options)
                    prepared = []
                    for implementation, bucket, entries, has_complex in buckets:
                        if has_complex:
                            stepped = real_views.enter_context(self._complex_as_real(bucket))
                            states = [self.state[view] for view in stepped]
                        else:
                            # Entries looked up in the check phase; those made since are looked up again.
                            stepped, states = bucket, [e if e else self.state[p] for e, p in zip(entries, bucket)]
                        if tracker is not None:
                            tracker.expect(group, bucket, stepped, states)
                        prepared.append(self._prepare(implementation, stepped, states, options, grad_scale,
                                                      found_inf))
                    runs += prepared
                    self._remember(group, options, buckets, prepared, grad_scale, found_inf)
            except BaseException:
                for p in made:  # a failed step leaves no state behind, not even a fresh one
                    del self.state[p]
                raise
            for run in runs:
                run()
        if tracker is not None:
            tracker.end_step()
        return loss

    # A step for hundreds of tensors spends most of its host time looking at each tensor: state
    # lookups, bucketing, contiguity, the launch plan's key. When a group's tensors are where they
    # were last step, the step replays that step's launches instead: its fingerprint (below) is the
    # one look at each tensor, and only the step's scalars are bound again.

    def _replayed_launches(self, group: dict, options: AdamWOptions, grad_scale, found_inf) -> _Replayed | None:
        """The launches of the group's last prepared step, for this step, if it may run them again.

        Checked with the rest of the step, before anything runs: new scalars (a
        scheduler's lr) or GradScaler tensors bind the same plans' launches
        again, and a kernel that cannot compile for them sends the group down
        the full path, which knows the fallback.
        """
        replay = self._replays.get(id(group))
        if replay is None or self._update_tracker is not None or _capturing():
            return None
        if options is not replay.options and not replay.options.differ_only_in_scalars(options):
            return None
        if self._fingerprint(group, options) != replay.fingerprint:
            return None
        if options is not replay.options or grad_scale is not replay.grad_scale or found_inf is not replay.found_inf:
            from selopt.kernels import KernelCompileError

            try:
                launches = [relaunch(options, grad_scale, found_inf) for relaunch in replay.relaunches]
            except KernelCompileError:
                return None
            replay = self._replays[id(group)] = replay._replace(
                options=options, grad_scale=grad_scale, found_inf=found_inf, launches=launches)
        return _Replayed(replay.launches)

    def _remember(self, group: dict, options: AdamWOptions, buckets: list, prepared: list, grad_scale,
                  found_inf) -> None:
        """Keep a group's prepared step for replay: when it runs on the kernels alone, made no copies,
        and tracks nothing. (Sharded and complex buckets and the reference prepare per tensor anyway.)"""
        relaunches = [getattr(step, "relaunch", None) for step in prepared]
        fingerprint = None
        if (self._update_tracker is None and None not in relaunches and not _capturing()
                and all(implementation is functional.TRITON and not has_complex
                        for implementation, _, _, has_complex in buckets)):
            fingerprint = self._fingerprint(group, options)
        if fingerprint is None:
            self._replays.pop(id(group), None)
        else:
            self._replays[id(group)] = _Replay(fingerprint, options, grad_scale, found_inf, relaunches,
                                               [step.launches for step in prepared])

    def _fingerprint(self, group: dict, options: AdamWOptions) -> tuple | None:
        """Every address a group's prepared step reaches, and the layouts it assumed (None: no complete state).

        Params and grads by address (``module.to()`` gives a Parameter new
        storage under the same object) and contiguity; state tensors by address
        (a replaced moment must not be written through a stale pointer); which
        params have a gradient. Soft masks are not here: setting one drops the replays.
        """
        params = group["params"]
        grads = [p.grad for p in params]
        stepped = [p for p, g in zip(params, grads) if g is not None]
        present = [g for g in grads if g is not None]
        state = self.state
        entries = [state.get(p) for p in stepped]
        names = ("exp_avg", "exp_avg_sq", "step", "max_exp_avg_sq") if options.amsgrad else (
            "exp_avg", "exp_avg_sq", "step")
        try:
            columns = [tuple([e[name].data_ptr() for e in entries]) for name in names]
            if options.stochastic_rounding:
                columns.append(tuple([e["rounding_seed"].data_ptr() if "rounding_seed" in e else 0 for e in entries]))
            return (tuple(map(Tensor.data_ptr, stepped)), tuple(map(Tensor.data_ptr, present)),
                    tuple(map(Tensor.is_contiguous, stepped)), tuple(map(Tensor.is_contiguous, present)), *columns)
        except (KeyError, TypeError, RuntimeError):  # state not made yet, or a sparse gradient
            return None

    def _buckets(self, params: list[Tensor], options: AdamWOptions) -> tuple[list, list[Tensor]]:
        """``params`` grouped by what picks an implementation, with their state entries as they are now
        (empty or None until made), and the params whose state is not complete yet.

        A bucket's key is (device, real param dtype, real moment dtype, DTensor or
        not, complex or not): complex params step as their real views. Moments not
        made yet count with the dtype they will be made in. Nothing changes here.
        """
        buckets, entries = defaultdict(list), defaultdict(list)
        fresh = []
        state = self.state
        needs_seed = options.stochastic_rounding
        for p in params:
            # One state lookup per param: hashing a Tensor is a Python call, and with hundreds of
            # tensors these lookups are a visible part of a step's host time.
            entry = state.get(p)
            dtype = p.dtype
            if not entry or (options.amsgrad and "max_exp_avg_sq" not in entry) or (
                    needs_seed and dtype == torch.bfloat16 and "rounding_seed" not in entry):
                fresh.append(p)
            state_dtype = entry["exp_avg"].dtype if entry else moment_dtype(dtype, options.moment_dtype)
            is_complex = dtype.is_complex
            if is_complex:
                dtype, state_dtype = dtype.to_real(), state_dtype.to_real()
            key = (p.device, dtype, state_dtype, distributed.is_dtensor(p), is_complex)
            buckets[key].append(p)
            entries[key].append(entry)
        return [(key, bucket, entries[key]) for key, bucket in buckets.items()], fresh

    def _prepare(self, implementation: functional.Implementation, bucket: list[Tensor], states: list[dict],
                 options: AdamWOptions, grad_scale, found_inf):
        # The kernels keep step counts and seeds on the device, the reference on the host. (is_cpu, not
        # .device: it makes no device object, and a count on another GPU implies moments there too,
        # which the kernels refuse.)
        counts_device = bucket[0].device if implementation.counts_on_device else torch.device("cpu")
        on_host = counts_device.type == "cpu"
        if any([s["step"].is_cpu != on_host for s in states]):
            for s in states:
                for key in ("step", "rounding_seed"):
                    if key in s:
                        s[key] = s[key].to(counts_device)
        if implementation.make_cache is not None and implementation.name not in self._caches:
            self._caches[implementation.name] = implementation.make_cache()
        tracker = self._update_tracker
        return functional.prepare_adamw(
            bucket,
            [p.grad for p in bucket],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if options.amsgrad else None,
            [s["step"] for s in states],
            options=options,
            soft_masks=[self._soft_masks.get(p) for p in bucket] if self._soft_masks else None,
            rounding_seeds=[s.get("rounding_seed") for s in states] if options.stochastic_rounding else None,
            grad_scale=grad_scale,
            found_inf=found_inf,
            selections=None if tracker is None else tracker.selection_buffers(bucket),
            cache=self._caches.get(implementation.name),
            implementation=implementation,
        )

    @contextlib.contextmanager
    def _complex_as_real(self, params: list[Tensor]):
        """``params`` with every complex tensor replaced by its real view, for the length of a step.

        The view gets the real views of the param's grad and moments as its state
        (the step count is shared) and its soft mask, so the implementations update
        the complex tensors in place without knowing about them. Nothing is left
        behind but a step count moved to another device, which the param keeps.
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
            for p, view in zip([p for p in params if p.is_complex()], views):
                view_state = self.state.pop(view)
                self.state[p]["step"] = view_state["step"]  # the implementation may have moved it
                self._soft_masks.pop(view, None)

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
            options = AdamWOptions.from_group(saved)
            for dtype in {p.dtype for p in saved["params"]}:
                _check_param_dtype(dtype, options)
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

        self.__setstate__({"state": state, "param_groups": saved_groups})  # resets the derived caches
        self._soft_masks.update(masks)  # a param whose entry has no mask keeps the one attached to it
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


class _Replay(NamedTuple):
    """A group's last prepared step on the kernels (see ``AdamW._replayed_launches``)."""

    fingerprint: tuple
    options: AdamWOptions
    grad_scale: Tensor | None
    found_inf: Tensor | None
    relaunches: list[Callable]  # per bucket: the launches for new options, grad_scale, found_inf
    launches: list[list]  # per bucket: the launches of the last step


class _Replayed(NamedTuple):
    launches: list[list]  # per bucket, ready to run


def _run_launches(launches: list) -> None:
    for launch in launches:
        launch()


def _capturing() -> bool:
    # A plan used during CUDA-graph capture is pinned by the plan cache's lookup: capture never replays.
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _warn_idle_options(optimizer: AdamW, group: dict, options: AdamWOptions, params: list[Tensor]) -> None:
    """Warn (``UserWarning``) about an option of ``group`` that does nothing at this step.

    ``stochastic_rounding=True`` rounds bf16 params only, and a non-default
    ``soft_mask_mode`` acts only through a soft mask. Each option of each group
    is looked at once, at its first step with gradients, from host values only
    (dtypes and the optimizer's masks), and never again, whatever it found:
    a step after that costs one set lookup per group.
    """
    # Kept out of state dicts and copies (torch pickles only defaults, state and groups): a copy warns again.
    checked = optimizer.__dict__.setdefault("_idle_options_checked", set())
    if not params:
        return  # nothing steps: nothing to judge the option by yet
    # stacklevel 6 points at the caller of opt.step(), through this function, step and torch's three
    # wrappers of it (no_grad, compiler.disable, the profiling hook); another depth only misplaces the line.
    def index() -> int:
        return next(i for i, g in enumerate(optimizer.param_groups) if g is group)

    if options.stochastic_rounding and (id(group), "stochastic_rounding") not in checked:
        checked.add((id(group), "stochastic_rounding"))
        dtypes = {p.dtype for p in params}
        if torch.bfloat16 not in dtypes:
            names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
            warnings.warn(f"stochastic_rounding=True does nothing in param group {index()}: it rounds bfloat16 params "
                          f"only, and this group's params are {names}", UserWarning, stacklevel=6)
    if options.soft_mask_mode != "update" and (id(group), "soft_mask_mode") not in checked:  # "update": the default
        checked.add((id(group), "soft_mask_mode"))
        masks = optimizer._soft_masks
        if not any(p in masks for p in group["params"]):
            warnings.warn(f"soft_mask_mode={options.soft_mask_mode!r} does nothing in param group {index()}: none of its "
                          "params has a soft mask (set_soft_mask or selopt.cofi.attach_soft_masks sets one)",
                          UserWarning, stacklevel=6)


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
    # The step moves the count (and the seed) to the device its implementation keeps them on.
    loaded["step"] = torch.as_tensor(step, dtype=torch.float32)
    if "rounding_seed" in entry:
        seed = entry["rounding_seed"]
        if not (isinstance(seed, int) or isinstance(seed, Tensor) and seed.numel() == 1 and not seed.is_floating_point()):
            raise ValueError(f"{where}['rounding_seed'] must be an integer or a one-element integer tensor, got {seed!r}")
        loaded["rounding_seed"] = torch.as_tensor(seed, dtype=torch.int64).reshape(())
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

    __signature__ = optimizer_signature(fraction=0.15)
