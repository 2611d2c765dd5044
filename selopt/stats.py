"""What an optimizer step moved: per param group, and per tensor on request.

Turn tracking on with :meth:`selopt.AdamW.track_updates`, step as usual, and
read the last step with :meth:`selopt.AdamW.update_stats`::

    opt.track_updates()
    loss.backward(); opt.step()
    print(opt.update_stats())   # per group: entries the update moved, entries weight decay changed

An entry is *moved* when the update applies to it: it is in MoFO's selection
``S`` (every entry when ``fraction=1``). Weight decay is counted apart,
because with ``decay="all"`` (the default, as torch's AdamW) it changes every
entry of every stepped parameter, selected or not; with ``decay="selected"``
it changes the moved entries only, and without weight decay none. A moved
entry whose soft mask is 0, or whose update is below its dtype's precision,
counts as moved even though its value may not change. A complex parameter
counts its real and imaginary parts as two entries, as its selection does.

Counting happens on the device and nothing is read back until
:meth:`~selopt.AdamW.update_stats` is called, so a tracked step does not
synchronise the host. Each group also counts its entries whose moments are
NaN or inf (``nonfinite``): they come from NaN or inf gradients, and they
always move, so the parameters turn non-finite as with torch's AdamW (see the
README for guards). What tracking costs, only while it is on:

- every group: one read of each stepped tensor's moments after the step, for
  the non-finite count (8 bytes per fp32 entry);
- dense groups (``fraction=1``): nothing more, their moved count is known;
- the torch reference: a copy of each selective tensor's selection into a scratch
  bool buffer, counted as the kernels' are;
- the Triton kernels: they write the selection of each selective tensor to a
  scratch bool buffer (1 byte per entry, allocated for the step), which one
  reduction per bucket of tensors counts (per tensor with ``per_tensor=True``);
  about 2 bytes per entry of memory traffic on top of AdamW's 28 (fp32);
- sharded (DTensor) params: one reduction per selective tensor on its local
  shard; :meth:`~selopt.AdamW.update_stats` then sums the shards' counts with
  one ``all_reduce`` per mesh, so every rank must call it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from selopt import distributed, quantization
from selopt.options import AdamWOptions


@dataclass(frozen=True)
class Counts:
    """Entries one step covered (params with a gradient), moved by the update, and changed by weight decay.

    ``nonfinite``: entries whose moments (``exp_avg`` or ``exp_avg_sq``) are NaN
    or inf after the step, left by a NaN or inf gradient. They always move
    (docs/design.md §2), so their parameters turn non-finite too, as with
    ``torch.optim.AdamW``; this count says how many there are and where.
    """

    entries: int
    moved: int
    decayed: int
    nonfinite: int = field(default=0, kw_only=True)

    @property
    def fraction(self) -> float:
        """Share of the entries the update moved (0.0 when none stepped).

        >>> Counts(entries=200, moved=30, decayed=200).fraction
        0.15
        """
        return self.moved / self.entries if self.entries else 0.0

    @property
    def decayed_fraction(self) -> float:
        """Share of the entries weight decay changed."""
        return self.decayed / self.entries if self.entries else 0.0


@dataclass(frozen=True)
class GroupStats(Counts):
    """:class:`Counts` of one param group, with the decay settings that explain ``decayed``.

    ``tensors`` (with ``per_tensor=True``) maps each parameter that stepped to
    its counts: by its name when the group was given named parameters
    (``param_names``), else by its index in the group's ``params``.
    """

    decay: str
    weight_decay: float
    tensors: dict[int | str, Counts] | None = None

    def __str__(self) -> str:
        moved = f"moved {self.fraction:.1%} ({self.moved:,} of {self.entries:,} entries)"
        if not self.weight_decay:
            text = f"{moved}; no weight decay"
        else:
            which = "every entry" if self.decay == "all" else "the moved entries only"
            text = f"{moved}; weight decay changed {self.decayed_fraction:.1%} (decay={self.decay!r}: {which})"
        if self.nonfinite:
            text += f"; {self.nonfinite:,} entries with NaN/inf moments (from NaN/inf gradients)"
        return text


@dataclass(frozen=True)
class UpdateStats:
    """What the last step moved, per param group (``groups[i]`` is ``param_groups[i]``).

    ``skipped`` is True when a GradScaler found inf/NaN gradients and the
    step changed nothing: every group then reports 0 moved and decayed.
    ``tracked`` is False before the first step tracking counted: every group
    then reports 0 entries.
    """

    groups: list[GroupStats]
    skipped: bool
    tracked: bool = True

    def __str__(self) -> str:
        if not self.tracked:
            return "no step tracked yet: the counts describe the first step() after track_updates()"
        lines = ["last step: skipped (inf/NaN gradients), nothing moved" if self.skipped else "last step:"]
        lines += [f"  group {i}: {group}" for i, group in enumerate(self.groups)]
        return "\n".join(lines)


class _Entry:
    """One stepped tensor of the current step: where it is, how many entries, and what moved."""

    __slots__ = ("key", "numel", "moved", "moments", "nonfinite", "shard_groups")

    def __init__(self, key: int | str, numel: int, moved, moments: tuple, shard_groups: tuple):
        self.key = key  # the param's name in its group, or its index in the group's "params"
        self.numel = numel  # whole-tensor entries, real components for a complex param
        self.moved = moved  # int (known on the host), a 0-d device count, _PENDING, or None: in a bucket count
        self.moments = moments  # (exp_avg, exp_avg_sq), local shards: counted after the step
        self.nonfinite = None  # 0-d device count of entries with a non-finite moment
        self.shard_groups = shard_groups  # process groups a DTensor's local counts are summed over


_PENDING = object()  # the count comes from a kernel's selection buffer at the end of the step


class _Step:
    """Everything recorded for one ``step()`` call; device counts stay unread until asked."""

    def __init__(self, param_groups: list[dict], options: list[AdamWOptions], found_inf: Tensor | None):
        self.group_index = {id(group): i for i, group in enumerate(param_groups)}
        self.names = [group.get("param_names") for group in param_groups]
        self.options = [(o.decay, o.weight_decay) for o in options]
        self.dense = [o.path == "dense" for o in options]
        self.found_inf = found_inf
        self.entries: list[list[_Entry]] = [[] for _ in param_groups]
        self.by_tensor: dict[int, tuple[int, _Entry]] = {}  # id(stepped tensor) -> (group, entry)
        # Kernel selection buffers: (group, entries, one flat buffer, a view of it per tensor).
        self.buffers: list[tuple[int, list[_Entry], Tensor, list[Tensor]]] = []
        # Per group, counts of whole buckets (per_tensor=False): (entries, 0-d device count).
        self.bucket_counts: list[list[tuple[int, Tensor]]] = [[] for _ in param_groups]


class UpdateTracker:
    """Collects one step's counts for :class:`selopt.AdamW`; the optimizer calls it at fixed points of a step.

    ``begin_step``, then ``expect`` for each set of tensors about to step,
    then ``selection_buffers`` for each bucket, which every implementation
    writes its selection into, then ``end_step``. A step that
    raises before ``end_step`` leaves the previous step's counts in place.
    """

    def __init__(self, per_tensor: bool):
        self.per_tensor = per_tensor
        self._current: _Step | None = None
        self._last: _Step | None = None

    def begin_step(self, param_groups: list[dict], options: list[AdamWOptions], found_inf: Tensor | None) -> None:
        """A step of ``param_groups`` with their validated ``options`` begins."""
        self._current = _Step(param_groups, options, found_inf)

    def expect(self, group: dict, params: list[Tensor], stepped: list[Tensor], states: list[dict]) -> None:
        """``params`` of ``group`` step now, as ``stepped`` (the real views of complex ones), with ``states``."""
        step = self._current
        group_index = step.group_index[id(group)]
        names = step.names[group_index]
        position = {id(p): i if names is None else names[i] for i, p in enumerate(group["params"])}
        dense = step.dense[group_index]
        for param, tensor, state in zip(params, stepped, states):
            # numel of a DTensor is the whole tensor's; a complex param's real view counts both parts.
            numel = tensor.numel()
            # 8-bit moments are non-finite through their block scales: count those, each standing for its block.
            scaled = "exp_avg_scale" in state
            keys = ("exp_avg_scale", "exp_avg_sq_scale") if scaled else ("exp_avg", "exp_avg_sq")
            moments = tuple(distributed.local(state[key]) for key in keys)
            if scaled:
                moments += (quantization.block_of(state["exp_avg"], state["exp_avg_scale"]),)
            entry = _Entry(position[id(param)], numel, numel if dense else _PENDING, moments,
                           distributed.shard_groups(param))
            step.entries[group_index].append(entry)
            step.by_tensor[id(tensor)] = (group_index, entry)

    def selection_buffers(self, bucket: list[Tensor]) -> list[Tensor] | None:
        """Bool buffers to write ``bucket``'s selections into (local shards' for DTensors); None when dense."""
        step = self._current
        group_index, first = step.by_tensor[id(bucket[0])]
        if first.moved is not _PENDING:
            return None
        entries = [step.by_tensor[id(p)][1] for p in bucket]
        shards = [distributed.local(p) for p in bucket]
        flat = torch.empty(sum(p.numel() for p in shards), dtype=torch.bool, device=shards[0].device)
        views, offset = [], 0
        for p in shards:
            views.append(flat[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()
        step.buffers.append((group_index, entries, flat, views))
        return views

    def end_step(self) -> None:
        """Count the selections and the non-finite moments (on the device); keep this step as the last one."""
        step = self._current
        for entries in step.entries:
            for entry in entries:
                entry.nonfinite = _nonfinite_count(*entry.moments)
                entry.moments = ()  # the state is not the tracker's to keep alive
        for group_index, entries, flat, views in step.buffers:
            # Shards are counted per tensor: update_stats sums each over its own process groups.
            if self.per_tensor or entries[0].shard_groups:
                for entry, view in zip(entries, views):
                    entry.moved = view.sum(dtype=torch.int64)
            else:
                # One reduction for the whole bucket; its entries leave the per-tensor lists.
                step.bucket_counts[group_index].append((sum(e.numel for e in entries), flat.sum(dtype=torch.int64)))
                for entry in entries:
                    entry.moved = None
        step.buffers.clear()  # the scratch memory goes back to the allocator now
        unrecorded = [e for entries in step.entries for e in entries if e.moved is _PENDING]
        if unrecorded:
            raise RuntimeError(f"selopt recorded no selection for {len(unrecorded)} selective tensor(s) of this step")
        self._last, self._current = step, None

    def stats(self, options: list[AdamWOptions]) -> UpdateStats:
        """Read the last step's counts: one device-to-host copy per device, one all_reduce per mesh.

        Before the first tracked step: ``tracked=False`` and zero counts for the groups of ``options``.
        """
        step = self._last
        if step is None:
            return UpdateStats([GroupStats(0, 0, 0, o.decay, o.weight_decay, {} if self.per_tensor else None)
                                for o in options],
                               skipped=False, tracked=False)
        pieces: list[Tensor] = []  # every device count, in a fixed order (the same on every rank)
        sharded: dict[tuple, list[int]] = defaultdict(list)  # shard groups -> positions in pieces
        for group_index, entries in enumerate(step.entries):
            for entry in entries:
                for count in (entry.moved, entry.nonfinite):
                    if isinstance(count, Tensor):
                        if entry.shard_groups:
                            sharded[entry.shard_groups].append(len(pieces))
                        pieces.append(count)
            pieces += [count for _, count in step.bucket_counts[group_index]]
        position = iter(_read(pieces, sharded))
        skipped = step.found_inf is not None and bool(step.found_inf)

        groups = []
        for (decay, weight_decay), entries, buckets in zip(step.options, step.entries, step.bucket_counts):
            tensors, nonfinite = {}, 0
            for entry in entries:
                moved = next(position) if isinstance(entry.moved, Tensor) else entry.moved
                entry_nonfinite = next(position)
                nonfinite += entry_nonfinite
                if moved is not None:  # else counted with its bucket
                    tensors[entry.key] = _counts(entry.numel, moved, decay, weight_decay, skipped, entry_nonfinite)
            bucket_totals = [(numel, next(position)) for numel, _ in buckets]
            total = _counts(
                sum(e.numel for e in entries if e.moved is not None) + sum(numel for numel, _ in bucket_totals),
                sum(c.moved for c in tensors.values()) + sum(moved for _, moved in bucket_totals),
                decay, weight_decay, skipped, nonfinite,
            )
            groups.append(GroupStats(total.entries, total.moved, total.decayed, decay, weight_decay,
                                     tensors if self.per_tensor else None, nonfinite=nonfinite))
        return UpdateStats(groups, skipped)


def _counts(entries: int, moved: int, decay: str, weight_decay: float, skipped: bool, nonfinite: int) -> Counts:
    if skipped:
        return Counts(entries, 0, 0, nonfinite=nonfinite)
    decayed = 0 if not weight_decay else entries if decay == "all" else moved
    return Counts(entries, moved, decayed, nonfinite=nonfinite)


def _nonfinite_count(exp_avg: Tensor, exp_avg_sq: Tensor, block: int = 1) -> Tensor:
    """Entries whose moments are not both finite, as a 0-d int64 device count (no host sync).

    For 8-bit moments the two tensors are the block scales and ``block`` the
    entries each stands for: a non-finite scale makes its whole block read so.
    """
    # m * 0 is NaN exactly where m is NaN or inf; adding v carries v's own NaN or inf.
    return exp_avg.mul(0).add_(exp_avg_sq).isfinite().logical_not_().sum(dtype=torch.int64) * block


def _read(pieces: list[Tensor], sharded: dict[tuple, list[int]]) -> list[int]:
    """The values of 0-d int64 counts: DTensor shards' counts summed over their process groups."""
    pieces = list(pieces)
    for groups, positions in sharded.items():
        local = torch.stack([pieces[i] for i in positions])
        for group in groups:
            dist.all_reduce(local, group=group)
        for i, value in zip(positions, local.unbind()):
            pieces[i] = value
    values: list[int] = [0] * len(pieces)
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, piece in enumerate(pieces):
        by_device[piece.device].append(i)
    for positions in by_device.values():
        for i, value in zip(positions, torch.stack([pieces[i] for i in positions]).tolist()):
            values[i] = value
    return values


class UpdateTracking:
    """The update-tracking methods of :class:`selopt.AdamW`, on an optimizer that keeps
    ``_update_tracker`` and calls it during its steps."""

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
        >>> opt = selopt.MoFO(model.parameters(), lr=1e-3, fraction=0.1)
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
        return self._update_tracker.stats([self._options_of(group) for group in self.param_groups])
