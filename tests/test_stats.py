"""Update statistics: counts equal the entries that really moved, on every path, and cost nothing when off.

Entries that moved are found by comparing parameters before and after a step
with no weight decay, so the counts are checked against the parameters, not
against the code that produced them.
"""

from __future__ import annotations

import json
import os
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import selopt
from selopt import functional, stats
from tests import gloo_workers

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["torch"] + (["triton"] if INTERPRET and functional.triton_problem() is None else [])


def _model(seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Tanh(), torch.nn.Linear(20, 7), torch.nn.LayerNorm(7))
    return model.to(dtype)


def _backward(model, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 12, generator=gen).to(next(model.parameters()).dtype)
    model(x).float().square().mean().backward()


def _step_and_diff(model, opt, seed: int) -> list[int]:
    """Step once; the number of entries of each parameter that changed."""
    before = [p.detach().clone() for p in model.parameters()]
    _backward(model, seed)
    opt.step()
    opt.zero_grad()
    return [int((p.detach() != b).sum()) for p, b in zip(model.parameters(), before)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [None, 16])
def test_counts_are_the_entries_that_moved(backend, block_size):
    model = _model()
    groups = selopt.param_groups(model, weight_decay=0.0, fraction=0.2, block_size=block_size)
    opt = selopt.MoFO(groups, lr=1e-2, backend=backend)
    opt.track_updates(per_tensor=True)
    before = opt.update_stats()  # no tracked step yet: zero counts, and it says so
    assert not before.tracked and [g.entries for g in before.groups] == [0, 0] and "no step tracked" in str(before)
    index = {id(p): (g, i) for g, group in enumerate(opt.param_groups) for i, p in enumerate(group["params"])}
    for seed in range(3):
        changed = _step_and_diff(model, opt, seed)
        result = opt.update_stats()
        assert not result.skipped
        for p, n in zip(model.parameters(), changed):
            g, i = index[id(p)]
            assert result.groups[g].tensors[i] == stats.Counts(p.numel(), n, 0)
        for g, group in enumerate(opt.param_groups):
            counts = result.groups[g]
            assert counts.entries == sum(p.numel() for p in group["params"])
            assert counts.moved == sum(c.moved for c in counts.tensors.values())
            assert (counts.decay, counts.weight_decay, counts.decayed) == ("all", 0.0, 0)
    selective, dense = result.groups
    assert 0.15 < selective.fraction < 0.3 and dense.fraction == 1.0  # floor(0.2 * n) per block, ties aside


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_counts_without_per_tensor(backend):
    model = _model()
    opt = selopt.MoFO(selopt.param_groups(model, weight_decay=0.0, fraction=0.3), lr=1e-2, backend=backend)
    opt.track_updates()
    changed = _step_and_diff(model, opt, 0)
    result = opt.update_stats()
    by_group = [sum(n for p, n in zip(model.parameters(), changed) if any(p is q for q in group["params"]))
                for group in opt.param_groups]
    assert [g.moved for g in result.groups] == by_group
    assert all(g.tensors is None for g in result.groups)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decayed_entries_are_reported_apart(backend):
    model = _model()
    groups = [{"params": [model[0].weight], "decay": "all"}, {"params": [model[2].weight], "decay": "selected"},
              {"params": [model[0].bias], "weight_decay": 0.0}]
    opt = selopt.MoFO(groups, lr=1e-2, weight_decay=0.1, fraction=0.25, backend=backend)
    opt.track_updates()
    _backward(model, 0)
    opt.step()
    decay_all, decay_selected, no_decay = opt.update_stats().groups
    assert decay_all.decayed == decay_all.entries == 240 and decay_all.moved == 60
    assert decay_selected.decayed == decay_selected.moved == 35 and decay_selected.entries == 140
    assert no_decay.decayed == 0 and no_decay.moved == 5
    assert "decay='all': every entry" in str(decay_all) and "the moved entries only" in str(decay_selected)
    assert str(no_decay).endswith("no weight decay")


@pytest.mark.parametrize("backend", BACKENDS)
def test_skipped_step_moves_nothing(backend):
    model = _model()
    opt = selopt.MoFO(model.parameters(), lr=1e-2, fraction=0.5, backend=backend)
    opt.track_updates()
    _backward(model, 0)
    opt.found_inf = torch.ones(())  # what GradScaler hands over when it found inf/NaN gradients
    opt.grad_scale = torch.ones(())
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    result = opt.update_stats()
    assert result.skipped and result.groups[0].moved == result.groups[0].decayed == 0
    assert result.groups[0].entries == sum(p.numel() for p in model.parameters())
    assert str(result).startswith("last step: skipped")


def test_complex_params_count_both_parts():
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(6, 5, dtype=torch.complex64))
    opt = selopt.MoFO([param], lr=1e-2, weight_decay=0.0, fraction=0.2, backend="torch")
    opt.track_updates()
    param.grad = torch.randn_like(param)
    before = torch.view_as_real(param.detach()).clone()
    opt.step()
    groups = opt.update_stats().groups
    assert groups[0].entries == 60
    assert groups[0].moved == int((torch.view_as_real(param.detach()) != before).sum()) == 12


def test_params_without_grad_are_not_counted_and_reads_are_per_step():
    model = _model()
    opt = selopt.AdamW(model.parameters(), weight_decay=0.0, backend="torch")
    opt.track_updates()
    model[0].weight.requires_grad_(False)
    _backward(model, 0)
    opt.step()
    first = opt.update_stats().groups[0]
    assert first.entries == first.moved == sum(p.numel() for p in model.parameters()) - 240
    assert opt.update_stats() == opt.update_stats()  # reading changes nothing
    opt.zero_grad()
    opt.step()  # no gradients: nothing steps
    assert opt.update_stats().groups[0] == stats.GroupStats(0, 0, 0, "all", 0.0)


def test_tracking_off_runs_nothing(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the tracker ran while tracking was off")

    for method in ("begin_step", "expect", "selection_buffers", "end_step"):
        monkeypatch.setattr(stats.UpdateTracker, method, fail)
    model = _model()
    opt = selopt.MoFO(model.parameters(), lr=1e-2, backend="torch")
    _backward(model, 0)
    opt.step()
    with pytest.raises(RuntimeError, match="track_updates"):
        opt.update_stats()
    opt.track_updates()
    opt.track_updates(False)
    opt.step()


def test_bad_arguments_change_nothing():
    opt = selopt.MoFO(_model().parameters())
    for bad in ({"enabled": 1}, {"per_tensor": "yes"}):
        with pytest.raises(TypeError, match=next(iter(bad))):
            opt.track_updates(**bad)
    assert opt._update_tracker is None


def test_tracking_is_not_state():
    import copy

    model = _model()
    opt = selopt.MoFO(model.parameters(), lr=1e-2, backend="torch")
    opt.track_updates()
    _backward(model, 0)
    opt.step()
    state = opt.state_dict()
    assert set(state) == {"state", "param_groups"}
    clone = copy.deepcopy(opt)
    with pytest.raises(RuntimeError, match="track_updates"):
        clone.update_stats()


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs TRITON_INTERPRET=1 and a usable Triton")
def test_kernels_get_selection_buffers_only_when_tracking_selective_groups(monkeypatch):
    from selopt.kernels import adamw

    seen = []
    real = adamw.prepare_adamw

    def spy(*args, **kwargs):
        seen.append(args[0].selections)
        return real(*args, **kwargs)

    monkeypatch.setattr("selopt.kernels.prepare_adamw", spy)
    model = _model()
    opt = selopt.MoFO(selopt.param_groups(model, fraction=0.3), lr=1e-2, backend="triton")
    _backward(model, 0)
    opt.step()
    assert seen == [None, None]
    seen.clear()
    opt.track_updates()
    opt.step()
    selective, dense = seen
    assert dense is None  # a dense group's count is known: no buffer, no kernel work
    assert [s.shape for s in selective] == [p.shape for p in opt.param_groups[0]["params"]]
    assert all(s.dtype == torch.bool for s in selective)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs TRITON_INTERPRET=1 and a usable Triton")
def test_kernel_compile_failure_falls_back_and_still_counts(monkeypatch):
    import triton

    from selopt.kernels import adamw, launch

    real = launch.compile_launches

    def compile_launches(launches, device):
        if launches[-1].constexprs["PARAM_DTYPE"] == triton.language.bfloat16:
            raise launch.KernelCompileError(launches[-1].name, launches[-1].constexprs, "cuda:90", NameError("X"))
        real(launches, device)

    monkeypatch.setattr(adamw, "compile_launches", compile_launches)
    monkeypatch.setattr(functional, "choose_implementation", lambda *args, **kwargs: functional.TRITON)
    torch.manual_seed(0)
    wide, narrow = torch.nn.Linear(12, 16, bias=False), torch.nn.Linear(16, 8, bias=False).bfloat16()
    opt = selopt.MoFO([wide.weight, narrow.weight], lr=1e-2, weight_decay=0.0, fraction=0.25)
    opt.track_updates(per_tensor=True)
    wide.weight.grad = torch.randn(16, 12)
    narrow.weight.grad = torch.randn(8, 16).bfloat16()
    with pytest.warns(RuntimeWarning, match="torch reference"):
        opt.step()
    tensors = opt.update_stats().groups[0].tensors
    assert (tensors[0].moved, tensors[1].moved) == (48, 32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("per_tensor", [False, True])
def test_tracked_steps_do_not_synchronise_on_cuda(per_tensor):
    model = _model().cuda()
    opt = selopt.MoFO(selopt.param_groups(model, weight_decay=0.0, fraction=0.2), lr=1e-2)
    opt.track_updates(per_tensor=per_tensor)
    _backward(model, 0)
    opt.step()  # warm-up: compiles the kernels, allocates the state
    torch.cuda.synchronize()
    before = [p.detach().clone() for p in opt.param_groups[0]["params"]]
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    changed = sum(int((p.detach() != b).sum()) for p, b in zip(opt.param_groups[0]["params"], before))
    assert opt.update_stats().groups[0].moved == changed


# ---------------------------------------------------------------- sharded (DTensor) params, two processes


def _sharded_worker(rank: int, out: str) -> None:
    # A file rendezvous: no port to pick, so no race with other processes for it.
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    result = {"ok": True}
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (2,))
        shapes, placements = [(7, 3), (5, 8), (6,)], [Shard(0), Shard(1), Shard(0)]
        gen = torch.Generator().manual_seed(0)
        inits = [torch.randn(s, generator=gen) for s in shapes]
        grads = [torch.randn(s, generator=gen) for s in shapes]
        single = [t.clone() for t in inits]

        # Both implementations on the shards (the kernels under the interpreter when they can run),
        # counting per tensor and per group.
        result["groups"] = []
        for backend in BACKENDS:
            for per_tensor in (True, False):
                def make(ps):
                    opt = selopt.MoFO([{"params": ps[:2]}, {"params": ps[2:], "fraction": 1.0}], lr=0.05,
                                      weight_decay=0.1, decay="selected", fraction=0.3, backend=backend)
                    opt.track_updates(per_tensor=per_tensor)
                    return opt

                params = [[torch.nn.Parameter(t.detach().clone()) for t in single],
                          [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [pl]))
                           for t, pl in zip(inits, placements)]]
                opts = make(params[0]), make(params[1])
                for p, q, g in zip(*params, grads):
                    p.grad = g.clone()
                    q.grad = distribute_tensor(g.clone(), mesh, q.placements)
                for opt in opts:
                    opt.step()
                assert opts[0].update_stats() == opts[1].update_stats(), (backend, per_tensor)
                result["groups"].append([[g.entries, g.moved, g.decayed] for g in opts[1].update_stats().groups])
    except Exception:
        result = {"ok": False, "error": traceback.format_exc()}
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(result, f)
    gloo_workers.leave()


def test_sharded_counts_equal_one_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch was built without torch.distributed / gloo")
    torch.multiprocessing.start_processes(_sharded_worker, args=(str(tmp_path),), nprocs=2, start_method="spawn")
    results = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    for rank, result in enumerate(results):
        assert result["ok"], f"rank {rank}:\n{result.get('error')}"
    # k = floor(0.3 * 21) = 6 and floor(0.3 * 40) = 12 across both shards; the dense group moves all 6.
    assert results[0]["groups"] == results[1]["groups"] == [[[61, 18, 18], [6, 6, 6]]] * 2 * len(BACKENDS)
