"""``selopt.AdamW`` and ``selopt.MoFO``: drop-in replacements for ``torch.optim.AdamW``.

The classes keep torch's param groups and state layout (:mod:`selopt.state`),
group each param group's tensors into buckets (:class:`selopt.bucket.Bucket`:
same device, dtypes and sharding), and hand each bucket to
:func:`selopt.functional.prepare_adamw` with the group's validated
:class:`~selopt.options.AdamWOptions` (``docs/design.md`` §4). Every bucket is
prepared before any runs, so a step either completes or changes nothing.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import Tensor

from selopt import complex_views, distributed, functional, state
from selopt.bucket import Bucket
from selopt.idle_options import warn_idle_options
from selopt.options import AdamWOptions, optimizer_signature
from selopt.soft_masks import SoftMasks, strip_soft_masks
from selopt.stats import UpdateTracker, UpdateTracking

__all__ = ["AdamW", "MoFO", "strip_soft_masks"]


class AdamW(SoftMasks, UpdateTracking, torch.optim.Optimizer):
    """AdamW that moves, each step, only the entries of each block with the largest momentum.

    With ``fraction=1`` (the default) this is ``torch.optim.AdamW``; below 1 it is
    MoFO (see :class:`MoFO`). The signature is ``torch.optim.AdamW``'s (its
    arguments mean what they mean there; ``foreach`` and ``fused`` are kept
    without effect), followed by selopt's keywords; every keyword is also a
    param-group key. The README's option table lists them all.

    Args:
        fraction: share of each block that moves per step, in (0, 1].
        block_size: None for one block per tensor (the MoFO paper), else a power
            of two: contiguous runs of the flattened tensor.
        decay: ``"all"`` decays every entry (torch AdamW, official MoFO);
            ``"selected"`` only the entries that move.
        soft_mask_mode: what a soft mask from :meth:`set_soft_mask` scales:
            ``"update"`` (default) or ``"grad"``, which barely acts under Adam.
        moment_dtype: None (fp32 for bf16/fp16 params, else the param dtype),
            ``torch.float32``, ``torch.bfloat16`` or ``"8bit"`` (:mod:`selopt.quantization`).
        stochastic_rounding: round bf16 params stochastically on store.
        backend: ``"auto"`` (Triton for CUDA tensors when it imports, else
            torch), ``"triton"`` or ``"torch"``.

    Complex parameters step as their real view, as in ``torch.optim.AdamW``
    (:mod:`selopt.complex_views`): their real and imaginary parts are two
    entries for selection too.

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
        arguments = {name: value for name, value in bound.arguments.items() if name != "params"}
        defaults = AdamWOptions(**arguments).group_defaults()  # betas as torch keeps them: 0-d tensors
        self._soft_masks: dict[Tensor, Tensor] = {}
        self._update_tracker: UpdateTracker | None = None  # see track_updates
        self._reset_caches()
        super().__init__(params, defaults)

    def _reset_caches(self) -> None:
        # Derived from the groups and the state, rebuilt when they are replaced: each group's validated
        # options (by id of the group dict), the fallback warnings given, and, public for diagnostics
        # (bench.window), each implementation's cache by name (the kernels' plans, replays, select state).
        self._options: dict[int, AdamWOptions] = {}
        self.caches: dict[str, object] = {}
        self._warned: set[str] = set()

    def _options_of(self, group: dict) -> AdamWOptions:
        """``group``'s options, validated when added; a value changed since (lr by a scheduler) is checked alone."""
        known = self._options.get(id(group))
        options = AdamWOptions.from_group(group) if known is None else known.of(group)
        self._options[id(group)] = options
        return options

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:  # the fallback holds for every later step too
            self._warned.add(message)
            functional.warn_fallback(message)

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
                state.check_param_dtype(tensor.dtype, options)
        super().add_param_group(param_group)

    def __getstate__(self) -> dict:
        # Soft masks are keyed by param: deepcopy maps them to the copied params along with the state.
        kept = {**super().__getstate__(), "_soft_masks": self._soft_masks}
        for derived in ("_options", "caches", "_warned", "_update_tracker"):
            kept.pop(derived, None)
        return kept

    def __setstate__(self, kept: dict) -> None:
        super().__setstate__(kept)
        for group in self.param_groups:
            state.complete_group(group, self.defaults)
        self.__dict__.setdefault("_soft_masks", {})
        self._update_tracker = None  # tracking is not state: a copy does not track
        self._reset_caches()

    # Compiled (torch.compile(opt.step), or a compiled training step) the step runs eagerly: Dynamo
    # would recompile for every step count the reference reads on the host.
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
        checked = [self._check_group(group, grad_scale, found_inf) for group in self.param_groups]
        tracker = self._update_tracker
        if tracker is not None:
            tracker.begin_step(self.param_groups, [options for _, options, *_ in checked], found_inf)
        with contextlib.ExitStack() as real_views:
            runs = self._prepare(checked, real_views, grad_scale, found_inf)
            for run in runs:
                run()
        if tracker is not None:
            tracker.end_step()
        return loss

    def _check_group(self, group: dict, grad_scale, found_inf) -> tuple:
        """(group, options, replayed launches or None, stepped params, buckets as (implementation, complex,
        positions among the params), params whose state is incomplete): checked, nothing changed."""
        options = self._options_of(group)
        params = [p for p in group["params"] if p.grad is not None]
        replayed = self._replayed(group, options, params, grad_scale, found_inf)  # a duplicate never replays
        if replayed is not None:
            return group, options, replayed, params, [], []
        if len(set(map(id, params))) != len(params):
            # torch warns about a param listed twice in a group and steps it twice; selopt steps it
            # once, since the kernels would update it twice in one launch, racing with themselves.
            params = list({id(p): p for p in params}.values())
        if any([p.grad.is_sparse for p in params]):
            raise RuntimeError("selopt does not support sparse gradients; use torch.optim.SparseAdam for them")
        for dtype in {p.dtype for p in params}:
            state.check_param_dtype(dtype, options)
        warn_idle_options(self, group, options, params, self._soft_masks)
        buckets, fresh = defaultdict(list), []
        for i, p in enumerate(params):
            entry = self.state.get(p)
            if state.incomplete(entry, p.dtype, options):
                fresh.append(p)
            moment_dtype, block = state.stored_format(entry, p, options.moment_dtype)
            buckets[(p.device, p.dtype.to_real(), moment_dtype.to_real(), block, distributed.is_dtensor(p),
                     p.dtype.is_complex)].append(i)
        chosen = [(functional.choose_implementation(device, dtype, moment_dtype, sharded=sharded, options=options,
                                                    warn=self._warn_once), is_complex, positions)
                  for (device, dtype, moment_dtype, _, sharded, is_complex), positions in buckets.items()]
        return group, options, None, params, chosen, fresh

    def _prepare(self, checked: list[tuple], real_views: contextlib.ExitStack, grad_scale, found_inf) -> list:
        """Every group's prepared steps, in order; state made for fresh params is removed if one raises."""
        runs, made = [], []
        try:
            for group, options, replayed, params, chosen, fresh in checked:
                if replayed is not None:
                    runs += [_launcher(launches) for launches in replayed]
                    continue
                made += [p for p in fresh if p not in self.state]
                for p in fresh:
                    state.complete(self.state[p], p, options)
                runs += self._prepare_group(group, options, params, chosen, real_views, grad_scale, found_inf)
        except BaseException:
            for p in made:  # a failed step leaves no state behind, not even a fresh one
                del self.state[p]
            raise
        return runs

    def _prepare_group(self, group, options, params, chosen, real_views, grad_scale, found_inf) -> list:
        tracker, prepared, buckets = self._update_tracker, [], []
        for implementation, is_complex, positions in chosen:
            members = [params[i] for i in positions]
            stepped = real_views.enter_context(
                complex_views.as_real(members, self.state, self._soft_masks)) if is_complex else members
            states = [self.state[p] for p in stepped]
            if tracker is not None:
                tracker.expect(group, members, stepped, states)
            state.place_counts(states, stepped[0].device if implementation.counts_on_device else torch.device("cpu"))
            bucket = self._bucket(stepped, states, options)
            buckets.append(bucket)
            if implementation.make_cache is not None and implementation.name not in self.caches:
                self.caches[implementation.name] = implementation.make_cache()
            prepared.append(functional.prepare_adamw(
                bucket, options, grad_scale=grad_scale, found_inf=found_inf,
                cache=self.caches.get(implementation.name), implementation=implementation, warn=self._warn_once))
        cache = self.caches.get(functional.TRITON.name)
        if cache is not None:
            if tracker is None and not _capturing() and all(
                    implementation is functional.TRITON and not is_complex for implementation, is_complex, _ in chosen):
                cache.remember(id(group), [positions for _, _, positions in chosen], buckets, prepared, options,
                               grad_scale, found_inf)
            else:
                cache.replays.pop(id(group), None)
        return prepared

    def _bucket(self, params: list[Tensor], states: list[dict], options: AdamWOptions) -> Bucket:
        masks, tracker = self._soft_masks, self._update_tracker
        return Bucket.from_state(params, states, options, soft_masks=[masks.get(p) for p in params] if masks else None,
                                 selections=None if tracker is None else tracker.selection_buffers(params))

    def _replayed(self, group: dict, options: AdamWOptions, params: list[Tensor], grad_scale, found_inf):
        """The launches of ``group``'s last prepared step, for this step, if its tensors stay put (else None)."""
        cache = self.caches.get(functional.TRITON.name)
        record = None if cache is None else cache.replays.get(id(group))
        if record is None or self._update_tracker is not None or _capturing():
            return None
        entries = list(map(self.state.get, params))
        if None in entries or sum(map(len, record.partition)) != len(params):
            return None
        try:
            buckets = [self._bucket(params, entries, options)] if len(record.partition) == 1 else [
                self._bucket([params[i] for i in positions], [entries[i] for i in positions], options)
                for positions in record.partition]  # one bucket holds the params in their order
            return cache.replay(id(group), buckets, options, grad_scale, found_inf)
        except (RuntimeError, NotImplementedError):  # a sparse gradient has no layout: the full path says so
            return None

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a selopt or ``torch.optim.AdamW`` state_dict, checked in full before anything changes.

        ``torch.optim.Optimizer.load_state_dict`` (hooks included), except that
        moments keep their precision (:func:`selopt.state.moment_dtype`: fp32
        moments of bf16 params stay fp32, where torch would round them to bf16),
        ``step`` is kept as an fp32 tensor, and soft masks are restored
        (:func:`selopt.state.loaded`).
        """
        state_dict = state_dict.copy()  # shallow, as torch: a pre-hook may replace its entries
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            state_dict = state_dict if result is None else result
        groups, loaded, masks = state.loaded(self.param_groups, self.defaults, state_dict)
        self.__setstate__({"state": loaded, "param_groups": groups})  # resets the derived caches
        self._soft_masks.update(masks)  # a param whose entry has no mask keeps the one attached to it
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


def _launcher(launches: list):
    def run() -> None:
        for launch in launches:
            launch()
    return run


def _capturing() -> bool:
    # A plan used during CUDA-graph capture is pinned by the plan cache's lookup: capture never replays.
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


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
