"""Sharded training: DTensor / FSDP2 / DDP steps equal one process, exact MoFO across shards, DCP resume.

The multi-process checks run in one pair of gloo CPU processes, started once
for the module (process start-up and torch import dominate their cost); each
scenario reports to a file, and one test per scenario reads it back.
"""

from __future__ import annotations

import copy
import json
import os
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import selopt
from selopt import distributed, functional, quantization, reference, selection
from tests import gloo_workers

WORLD = 2
STEPS = 4
KERNELS = os.environ.get("TRITON_INTERPRET") == "1" and functional.triton_problem() is None


# ---------------------------------------------------------------- single process


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("numel", [1, 2, 7, 100, 1031])
@pytest.mark.parametrize("fraction", [0.01, 0.15, 0.5, 0.999])
@pytest.mark.parametrize("values", ["normal", "ties", "nan", "all_nan", "zeros"])
def test_radix_select_matches_topk_selection(dtype, numel, fraction, values):
    gen = torch.Generator().manual_seed(numel)
    m = torch.randn(numel, generator=gen, dtype=dtype) * torch.logspace(-30, 30, numel, dtype=dtype)
    if values == "ties":
        m = torch.randint(-3, 4, (numel,), generator=gen).to(dtype)
    elif values == "nan":
        m[::3] = float("nan")
        m[1::5] = float("inf")
    elif values == "all_nan":
        m.fill_(float("nan"))
    elif values == "zeros":
        m.zero_()
    k = reference.block_k(fraction, numel)
    keys = selection.magnitude_keys(m)
    (threshold,) = selection.radix_thresholds([keys], [k])
    assert threshold.dtype == (torch.int64 if dtype == torch.float64 else torch.int32)
    assert torch.equal(keys >= threshold, reference.selection_mask(m, fraction))


def test_magnitude_keys_order_like_magnitudes():
    m = torch.tensor([0.0, -0.0, 1e-45, -2.0, 3.0, float("inf"), float("nan"), -float("nan")])
    bits = selection.magnitude_keys(m)
    finite_order = bits[:6].argsort(stable=True)
    assert torch.equal(m[:6].abs()[finite_order], m[:6].abs().sort(stable=True).values)
    assert (bits[6:] == selection.NAN_KEY[torch.int32]).all() and (bits[:6] < bits[6:].min()).all()
    assert bits[0] == bits[1] == 0 and bits[2] == selection.MIN_THRESHOLD  # the smallest non-zero |m|


def test_plain_params_exchange_nothing():
    model = torch.nn.Linear(64, 64)
    opt = selopt.MoFO(model.parameters(), fraction=0.1)
    assert functional.selection_bytes_per_step(opt) == 0
    assert not distributed.is_dtensor(model.weight)


# ---------------------------------------------------------------- two processes


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN matching NaN (a NaN gradient leaves NaN moments behind)."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _moved(before: list[torch.Tensor], after: list[torch.Tensor]) -> list[torch.Tensor]:
    return [a != b for a, b in zip(after, before)]


def _full(params) -> list[torch.Tensor]:
    # full_tensor() of an already replicated DTensor is its local tensor itself, not a copy.
    return [(p.full_tensor() if distributed.is_dtensor(p) else p).detach().clone() for p in params]


def _dtensor_run(shapes, placements, dtype, make_opt, grad_fn, soft_masks=None, mesh_shape=(WORLD,)):
    """STEPS steps of make_opt on DTensor params and on the same whole tensors in one process.

    ``placements[i]`` is one placement (1-D mesh) or a tuple, one per mesh dim.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", mesh_shape)
    gen = torch.Generator().manual_seed(0)
    inits = [torch.randn(shape, generator=gen).to(dtype) for shape in shapes]
    single = [torch.nn.Parameter(t.clone()) for t in inits]
    placements = [pl if isinstance(pl, tuple) else (pl,) for pl in placements]
    sharded = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, pl)) for t, pl in zip(inits, placements)]
    opt_single, opt_sharded = make_opt(single), make_opt(sharded)
    for i, mask in (soft_masks or {}).items():
        opt_single.set_soft_mask(single[i], mask)
        opt_sharded.set_soft_mask(sharded[i], mask)
    for step in range(STEPS):
        grads = [grad_fn(step, i, shape, dtype) for i, shape in enumerate(shapes)]
        before_single, before_sharded = _full(single), _full(sharded)
        for p, q, g in zip(single, sharded, grads):
            p.grad = g.clone()
            q.grad = distribute_tensor(g.clone(), mesh, q.placements)
        opt_single.step()
        opt_sharded.step()
        moved_single = _moved(before_single, _full(single))
        moved_sharded = _moved(before_sharded, _full(sharded))
        for i, (a, b) in enumerate(zip(moved_single, moved_sharded)):
            assert torch.equal(a, b), f"step {step}, param {i} {shapes[i]}: sharded moved other entries"
    for i, (p, q) in enumerate(zip(_full(single), _full(sharded))):
        assert _same(p, q), f"param {i} {shapes[i]}: max diff {(p - q).abs().max()}"
    for p, q in zip(single, sharded):
        for key in ("exp_avg", "exp_avg_sq"):
            assert distributed.is_dtensor(opt_sharded.state[q][key])
            assert tuple(opt_sharded.state[q][key].placements) == tuple(q.placements)
            assert _same(opt_single.state[p][key], opt_sharded.state[q][key].full_tensor())
    return opt_sharded, sharded


def _tie_heavy_grad(step, i, shape, dtype):
    gen = torch.Generator().manual_seed(1000 * step + i)
    if i % 2:
        grad = torch.randint(-3, 4, shape, generator=gen).to(dtype) * 0.5  # many |m| ties
    else:
        grad = torch.randn(shape, generator=gen).to(dtype)
    if i == 0 and step == 1 and grad.numel() > 2:
        grad.view(-1)[2] = float("nan")  # that entry's m stays NaN: never selected again
    return grad


def _scenario_dtensor_exact(tmp):
    from torch.distributed.tensor import Shard

    # Uneven rows (7 over 2 ranks), a rank with no rows (1 row), 1-D, 3-D, Shard(1), and a matrix
    # large enough that the exchanged bytes are a small share of it.
    shapes = [(7, 3), (1, 5), (5,), (2, 3, 5), (3, 7), (1024, 96)]
    placements = [Shard(0), Shard(0), Shard(0), Shard(0), Shard(1), Shard(0)]
    report = {}
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        for amsgrad in (False, True):
            with distributed.Traffic() as traffic:
                opt, params = _dtensor_run(
                    shapes, placements, dtype,
                    # On CPU, DTensor shards step on the reference and plain tensors, by default, on the
                    # fused CPU path: backend="torch" compares like with like, bit for bit.
                    lambda ps: selopt.MoFO(ps, lr=0.05, weight_decay=0.1, fraction=0.3, decay="selected",
                                           amsgrad=amsgrad, backend="torch"),
                    _tie_heavy_grad,
                )
            per_step = functional.selection_bytes_per_step(opt)
            rounds = selection.RADIX_ROUNDS[torch.int64 if dtype == torch.float64 else torch.int32]
            # One int32 count per bin of every round: 16 KiB a tensor (fp32 keys), 36 KiB (fp64 keys).
            assert per_step == len(shapes) * sum(1 << bits for _, bits in rounds) * 4
            rounds = len(rounds)
            assert traffic.bytes == STEPS * per_step
            assert traffic.all_reduces == STEPS * rounds  # one per round for the whole group
            if dtype == torch.bfloat16:
                continue
            big = params[-1]
            report[str(dtype)] = dict(bytes_per_step=per_step, per_tensor=per_step // len(shapes),
                                      big_param_bytes=big.numel() * big.element_size())
            assert per_step // len(shapes) * 10 < big.numel() * big.element_size()
    return report


def _scenario_dtensor_dense(tmp):
    from torch.distributed.tensor import Shard

    shapes = [(7, 3), (1, 5), (3, 7)]
    with distributed.Traffic() as traffic:
        _, params = _dtensor_run(shapes, [Shard(0), Shard(0), Shard(1)], torch.float32,
                                 lambda ps: selopt.AdamW(ps, lr=0.05, weight_decay=0.1, backend="torch"),
                                 _tie_heavy_grad)
    assert traffic.bytes == 0



def _scenario_dtensor_8bit(tmp):
    # 8-bit moments: the same state and values on 2 ranks as on one. Rows that split unevenly (33
    # over 2 ranks, 3 of 4096 entries), every block size (128, 32, 256) and a tensor too small for
    # 8 bits; blocks are cut from the whole tensor's rows, so no shard boundary crosses one.
    from torch.distributed.tensor import Replicate, Shard

    shapes = [(33, 128), (64, 96), (3, 4096), (40, 50), (7, 3)]
    placements = [Shard(0), Shard(0), Shard(0), Replicate(), Shard(0)]
    # Block mode selects per block of the local shard (the module's docstring): shards of whole blocks.
    variants = {"exact": (shapes, placements, dict(fraction=0.3, decay="selected")),
                "dense": (shapes, placements, dict(fraction=1.0)),
                "block": ([(32, 256)], [Shard(0)], dict(fraction=0.3, block_size=256))}
    for name, (shapes, placements, options) in variants.items():
        opt, params = _dtensor_run(
            shapes, placements, torch.float32,
            lambda ps: selopt.MoFO(ps, lr=0.05, weight_decay=0.1, moment_dtype="8bit", backend="torch", **options),
            _tie_heavy_grad)
        for p, shape in zip(params, shapes):
            state, quantized = opt.state[p], quantization.quant_block(shape) is not None
            assert (state["exp_avg"].dtype == torch.uint8) == quantized, (name, shape)
            for key in ("exp_avg_scale", "exp_avg_sq_scale") if quantized else ():
                assert distributed.is_dtensor(state[key]) and tuple(state[key].placements) == tuple(p.placements)
    return "1 and 2 ranks agree bit for bit on 8-bit state (exact, dense, block 256)"


def _scenario_kernels_dtensor(tmp):
    # The kernels on local shards (under the interpreter here) select exactly what one process
    # running the kernels on the whole tensors selects, and write the same values.
    from torch.distributed.tensor import Shard

    if not KERNELS:
        return "skipped: the kernels on CPU need TRITON_INTERPRET=1 and a usable Triton"
    # Small, for the interpreter; (40, 130) spans two exact-path programs per rank.
    shapes = [(7, 3), (1, 5), (5,), (2, 3, 5), (3, 7), (40, 130)]
    placements = [Shard(0), Shard(0), Shard(0), Shard(0), Shard(1), Shard(0)]
    gen = torch.Generator().manual_seed(5)
    masks = {0: torch.rand(7, generator=gen), 3: torch.rand(2, 3, 5, generator=gen)}
    # Block mode selects per block of the local shard: a shape whose shards hold whole blocks
    # (8 rows of 128 a rank) selects as one process does.
    variants = {
        "exact": (shapes, placements, masks, dict(fraction=0.3, decay="selected", amsgrad=True)),
        "dense": (shapes, placements, masks, dict(fraction=1.0)),
        "block": ([(16, 128)], [Shard(0)], None, dict(fraction=0.3, block_size=1024)),
        # 8-bit moments, rows split unevenly (33 over 2 ranks); one bucket (blocks of 128), so one
        # radix select per step; dense with blocks of 128 and 32 and an fp32-sized tensor.
        "exact 8-bit": ([(33, 128), (40, 128)], [Shard(0)] * 2, None,
                        dict(fraction=0.3, decay="selected", moment_dtype="8bit")),
        "dense 8-bit": ([(33, 128), (64, 96), (7, 3)], [Shard(0)] * 3, None, dict(fraction=1.0, moment_dtype="8bit")),
    }
    report = {}
    for dtype in (torch.float32, torch.bfloat16):
        for name, (shapes, placements, masks, options) in variants.items():
            with distributed.Traffic() as traffic:
                opt, _ = _dtensor_run(
                    shapes, placements, dtype,
                    lambda ps: selopt.MoFO(ps, lr=0.05, weight_decay=0.1, backend="triton", **options),
                    _tie_heavy_grad, soft_masks=masks)
            assert list(opt.caches) == ["sharded triton"], list(opt.caches)
            per_step = functional.selection_bytes_per_step(opt)
            assert traffic.bytes == STEPS * per_step
            assert traffic.all_reduces == (STEPS * 3 if name.startswith("exact") else 0)
            report[f"{dtype} {name}"] = per_step // len(shapes)
    # A threshold that holds still (beta1 = 0 and the same gradient every step): after the first
    # steps every shard refines from its candidate list, choosing so from the summed counters.
    opt, _ = _dtensor_run([(40, 130)], [Shard(0)], torch.float32,
                          lambda ps: selopt.MoFO(ps, lr=0.05, betas=(0.0, 0.999), fraction=0.3, backend="triton"),
                          lambda step, i, shape, dtype: torch.randn(shape, generator=torch.Generator().manual_seed(i)))
    from selopt.kernels import select_state

    (_, state), = opt.caches["sharded triton"].selection_states()
    assert state[:, select_state.STATE_FROM_LIST.value].tolist() == [1], state
    return report


def _scenario_hsdp_meshes(tmp):
    from torch.distributed.tensor import Replicate, Shard

    # 2-D meshes as HSDP builds them (replicate dim, shard dim): the histogram is summed over
    # the shard dim only, whether the ranks sit on it (1, 2) or on the replicate dim (2, 1).
    # On the torch reference, and on the kernels when they can run here.
    shapes = [(7, 3), (1, 5), (256, 9)]
    for mesh_shape, backend in [(m, b) for m in ((1, WORLD), (WORLD, 1)) for b in ("torch", "triton")[:1 + KERNELS]]:
        with distributed.Traffic() as traffic:
            opt, _ = _dtensor_run(shapes, [(Replicate(), Shard(0))] * 3, torch.float32,
                                  lambda ps: selopt.MoFO(ps, lr=0.05, weight_decay=0.0, fraction=0.3, backend=backend),
                                  _tie_heavy_grad, mesh_shape=mesh_shape)
        sharded_over = mesh_shape[1] > 1
        # The kernels also sum their candidate window's four counters with the first round.
        counts_per_tensor = 4096 + (4 if backend == "triton" else 0)
        assert functional.selection_bytes_per_step(opt) == (len(shapes) * counts_per_tensor * 4 if sharded_over else 0)
        assert traffic.bytes == STEPS * functional.selection_bytes_per_step(opt)


def _scenario_dtensor_soft_mask(tmp):
    from torch.distributed.tensor import Shard

    shapes = [(7, 3), (4, 6), (3, 7), (5,)]
    placements = [Shard(0), Shard(0), Shard(1), Shard(0)]
    gen = torch.Generator().manual_seed(7)
    masks = {0: torch.rand(7, generator=gen), 1: torch.rand(4, 6, generator=gen), 2: torch.rand(3, generator=gen),
             3: torch.rand(5, generator=gen)}
    masks = {i: m.double() for i, m in masks.items()}

    def make(ps):
        return selopt.MoFO([{"params": ps[:2]}, {"params": ps[2:], "soft_mask_mode": "grad"}],
                           lr=0.05, weight_decay=0.0, fraction=0.4)

    _dtensor_run(shapes, placements, torch.float64, make, _tie_heavy_grad, soft_masks=masks)


def _scenario_dtensor_block(tmp):
    from torch.distributed.tensor import Shard

    # Aligned: ceil(rows / 2) * row_numel is a multiple of block_size, so local blocks are the global ones.
    for shape, block in (((8, 4), 8), ((6, 8), 8), ((16,), 4), ((4, 3, 4), 8)):
        _dtensor_run([shape], [Shard(0)], torch.float64,
                     lambda ps: selopt.MoFO(ps, lr=0.05, weight_decay=0.0, fraction=0.3, block_size=block,
                                            backend="torch"),
                     _tie_heavy_grad)
    # Not aligned: blocks are cut from each rank's local shard; check against exactly that.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    for shape, block in (((5, 3), 4), ((6, 8), 16), ((7,), 2)):
        init = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        sharded = torch.nn.Parameter(distribute_tensor(init.clone(), mesh, [Shard(0)]))
        local = torch.nn.Parameter(sharded.to_local().detach().clone())
        opts = [selopt.MoFO([p], lr=0.05, weight_decay=0.0, fraction=0.3, block_size=block) for p in (sharded, local)]
        for step in range(STEPS):
            grad = _tie_heavy_grad(step, 1, shape, torch.float64)
            sharded.grad = distribute_tensor(grad, mesh, [Shard(0)])
            local.grad = sharded.grad.to_local().clone()
            for opt in opts:
                opt.step()
        assert torch.equal(sharded.to_local(), local.detach())


def _mlp(dtype, seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).to(dtype)


def _batch(step, dtype):
    gen = torch.Generator().manual_seed(step)
    return torch.randn(2 * WORLD, 6, generator=gen, dtype=dtype), torch.randn(2 * WORLD, 3, generator=gen, dtype=dtype)


def _train(model, opt, steps, rank, first_step=0, record=None):
    """Each rank sees its half of the batch; rank None means one process seeing all of it."""
    for step in range(first_step, first_step + steps):
        x, y = _batch(step, next(model.parameters()).dtype)
        if rank is not None:
            x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        before = _full(model.parameters())
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if record is not None:
            record.append(_moved(before, _full(model.parameters())))


def _make_opt(kind, model, backend="auto", moment_dtype=None):
    if kind == "mofo":
        return selopt.MoFO(selopt.param_groups(model, weight_decay=0.05, fraction=0.25, decay="selected"), lr=0.02,
                           backend=backend, moment_dtype=moment_dtype)
    return selopt.AdamW(model.parameters(), lr=0.02, weight_decay=0.05, backend=backend)


def _compare_to_single(wrap, kind, rank):
    model = _mlp(torch.float64, seed=1)
    single = copy.deepcopy(model)
    model = wrap(model)
    masks_single, masks_sharded = [], []
    _train(single, _make_opt(kind, single), STEPS, None, record=masks_single)
    _train(model, _make_opt(kind, model), STEPS, rank, record=masks_sharded)
    for step, (a, b) in enumerate(zip(masks_single, masks_sharded)):
        for i, (x, y) in enumerate(zip(a, b)):
            assert torch.equal(x, y), f"step {step}, param {i}: different entries moved"
    for i, (p, q) in enumerate(zip(_full(single.parameters()), _full(model.parameters()))):
        # Only the gradient's reduction order differs (per-rank means, then their average).
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12, msg=lambda m: f"param {i}: {m}")


def _fsdp2(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def _scenario_fsdp2_mofo(tmp):
    _compare_to_single(_fsdp2, "mofo", dist.get_rank())


def _scenario_fsdp2_adamw(tmp):
    _compare_to_single(_fsdp2, "adamw", dist.get_rank())


def _scenario_ddp_mofo(tmp):
    _compare_to_single(torch.nn.parallel.DistributedDataParallel, "mofo", dist.get_rank())


def _scenario_ddp_adamw(tmp):
    _compare_to_single(torch.nn.parallel.DistributedDataParallel, "adamw", dist.get_rank())


def _scenario_dcp_resume(tmp):
    _dcp_resume(tmp, "torch")


def _scenario_dcp_resume_8bit(tmp):
    _dcp_resume(tmp, "torch", moment_dtype="8bit")


def _scenario_kernels_dcp_resume_8bit(tmp):
    if not KERNELS:
        return "skipped: the kernels on CPU need TRITON_INTERPRET=1 and a usable Triton"
    _dcp_resume(tmp, "triton", moment_dtype="8bit")


def _scenario_kernels_dcp_resume(tmp):
    if not KERNELS:
        return "skipped: the kernels on CPU need TRITON_INTERPRET=1 and a usable Triton"
    _dcp_resume(tmp, "triton")


def _wide_mlp(dtype, seed):
    # Matrices of 4096+ entries with rows that split unevenly over 2 ranks (33 rows): 8-bit moments.
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 128), torch.nn.Tanh(), torch.nn.Linear(128, 33), torch.nn.Tanh(),
                               torch.nn.Linear(33, 3)).to(dtype)


def _dcp_resume(tmp, backend, moment_dtype=None):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
    )

    rank = dist.get_rank()
    mlp = _mlp if moment_dtype is None else _wide_mlp
    uninterrupted = _fsdp2(mlp(torch.float32, seed=1))
    opt = _make_opt("mofo", uninterrupted, backend, moment_dtype)
    _train(uninterrupted, opt, 2 * STEPS, rank)

    first = _fsdp2(mlp(torch.float32, seed=1))
    opt_first = _make_opt("mofo", first, backend, moment_dtype)
    _train(first, opt_first, STEPS, rank)
    checkpoint = os.path.join(tmp, f"dcp-{backend}-{moment_dtype}")
    dcp.save({"model": get_model_state_dict(first), "optim": get_optimizer_state_dict(first, opt_first)},
             checkpoint_id=checkpoint)

    resumed = _fsdp2(mlp(torch.float32, seed=2))  # other weights: the load must overwrite them
    opt_resumed = _make_opt("mofo", resumed, backend, moment_dtype)
    state = {"model": get_model_state_dict(resumed), "optim": get_optimizer_state_dict(resumed, opt_resumed)}
    dcp.load(state, checkpoint_id=checkpoint)
    set_model_state_dict(resumed, state["model"])
    set_optimizer_state_dict(resumed, opt_resumed, state["optim"])
    _train(resumed, opt_resumed, STEPS, rank, first_step=STEPS)

    for p, q in zip(uninterrupted.parameters(), resumed.parameters()):
        assert torch.equal(p.to_local(), q.to_local())
        assert opt.state[p].keys() == opt_resumed.state[q].keys()
        for key in ("exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale"):
            if key in opt.state[p]:
                assert torch.equal(opt.state[p][key].to_local(), opt_resumed.state[q][key].to_local()), key
    if moment_dtype == "8bit":
        assert {opt.state[p]["exp_avg"].dtype for p in uninterrupted.parameters()} == {torch.uint8, torch.float32}
    for p, q in zip(uninterrupted.parameters(), resumed.parameters()):
        assert float(opt.state[p]["step"]) == float(opt_resumed.state[q]["step"]) == 2 * STEPS


SCENARIOS = {
    name[len("_scenario_"):]: fn for name, fn in globals().items() if name.startswith("_scenario_")
}


def _worker(rank: int, tmp: str) -> None:
    # A file rendezvous (no port to pick, so no race for one) and a short timeout: a rank that fails
    # inside a collective must not leave the other waiting for 30 minutes.
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        for name, scenario in SCENARIOS.items():
            result = {"ok": True}
            try:
                result["report"] = scenario(tmp)
            except Exception:
                result = {"ok": False, "error": traceback.format_exc()}
            with open(os.path.join(tmp, f"{name}.{rank}.json"), "w") as f:
                json.dump(result, f)
            # A rank that failed early may have skipped collectives: realign before the next scenario.
            dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    gloo_workers.leave()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch was built without torch.distributed / gloo")
    tmp = str(tmp_path_factory.mktemp("dist"))
    torch.multiprocessing.start_processes(_worker, args=(tmp,), nprocs=WORLD, start_method="spawn")
    return tmp


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_two_ranks(two_ranks, scenario):
    for rank in range(WORLD):
        path = os.path.join(two_ranks, f"{scenario}.{rank}.json")
        assert os.path.exists(path), f"rank {rank} did not reach scenario {scenario}"
        with open(path) as f:
            result = json.load(f)
        assert result["ok"], f"rank {rank}:\n{result['error']}"
        if str(result.get("report")).startswith("skipped: "):
            pytest.skip(result["report"][len("skipped: "):])
        if result.get("report"):
            print(scenario, rank, result["report"])
