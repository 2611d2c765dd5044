"""GPU-only checks of the kernels: large tensors, a Llama-like tensor list, CUDA graphs, no host sync,
unbiased stochastic rounding over many steps, int64 offsets. Skipped without a CUDA device."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (compiled Triton kernels)"),
]
pytest.importorskip("triton", reason="the kernel tests need Triton (pip install 'selopt[triton]')")

import selopt  # noqa: E402
from selopt import reference  # noqa: E402
from selopt.bucket import Bucket  # noqa: E402
from selopt.options import AdamWOptions  # noqa: E402

if torch.cuda.is_available():
    from selopt import kernels
    from test_kernels import HYPER, Bucket

DEVICE = "cuda"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [4096, None])
def test_large_tensors_match_reference(dtype, block_size):
    bucket = Bucket([(2**24 + 3,), (4097, 1023), (1,)], dtype, seed=21)
    options = dict(HYPER, fraction=0.1, block_size=block_size)
    bucket.step(**options)
    bucket.check(**options)


def llama_like_shapes(hidden=2048, intermediate=5632, kv_hidden=512, layers=2, vocab=32000):
    shapes = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (kv_hidden, hidden), (kv_hidden, hidden), (hidden, hidden),
                   (intermediate, hidden), (intermediate, hidden), (hidden, intermediate), (hidden,), (hidden,)]
    return shapes + [(hidden,), (vocab, hidden)]


@pytest.mark.parametrize("block_size", [256, 8192, None])
def test_llama_like_tensor_list_matches_reference(block_size):
    bucket = Bucket(llama_like_shapes(), torch.bfloat16, seed=22)
    options = dict(HYPER, fraction=0.15, block_size=block_size)
    bucket.step(**options)
    bucket.check(**options)


def _model_and_optimizer(block_size, **options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 384), torch.nn.GELU(), torch.nn.Linear(384, 128)).to(DEVICE)
    opt = selopt.MoFO(model.parameters(), lr=torch.tensor(1e-3, device=DEVICE), fraction=0.2,
                      block_size=block_size, backend="triton", **options)
    x = torch.randn(64, 256, device=DEVICE)
    model(x).square().mean().backward()  # static grads, reused by every step
    return model, opt


@pytest.mark.parametrize("block_size", [1024, None])
def test_cuda_graph_replay_equals_eager(block_size):
    eager_model, eager_opt = _model_and_optimizer(block_size, amsgrad=True)
    graph_model, graph_opt = _model_and_optimizer(block_size, amsgrad=True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graph_opt.step()  # warm-up: builds state, compiles, caches the launch plans
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_opt.step()

    eager_opt.step()
    for step in range(4):
        graph_opt.param_groups[0]["lr"].fill_(1e-3 * (step + 1))  # a schedule, through the device lr
        eager_opt.param_groups[0]["lr"].fill_(1e-3 * (step + 1))
        graph.replay()
        eager_opt.step()
    torch.cuda.synchronize()
    for a, b in zip(eager_model.parameters(), graph_model.parameters()):
        assert torch.equal(a, b)
    for p_eager, p_graph in zip(eager_model.parameters(), graph_model.parameters()):
        assert float(eager_opt.state[p_eager]["step"]) == float(graph_opt.state[p_graph]["step"]) == 5.0


@pytest.mark.parametrize("block_size", [1024, None])
@pytest.mark.parametrize("fraction", [0.2, 1.0])
def test_step_does_not_synchronise_the_host(block_size, fraction):
    model, opt = _model_and_optimizer(block_size)
    opt.param_groups[0]["fraction"] = fraction
    opt.step()  # first step: state and launch plans are created (host-to-device copies)
    scale = torch.tensor(1024.0, device=DEVICE)
    opt.zero_grad(set_to_none=False)  # grads keep their addresses: the cached plan is reused
    (model(torch.randn(64, 256, device=DEVICE)).square().mean() * scale).backward()
    # What GradScaler hands an optimizer that unscales itself: device tensors, never read back.
    opt.grad_scale, opt.found_inf = scale, torch.zeros((), device=DEVICE)
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        del opt.grad_scale, opt.found_inf
    assert all(float(opt.state[p]["step"]) == 2.0 for p in model.parameters())


def test_stochastic_rounding_unbiased_over_many_steps():
    # Each step moves p by lr, below half a bf16 ulp at 1.0: round-to-nearest never moves it,
    # stochastic rounding moves it by lr on average.
    n, lr, steps = 2**20, 1e-3, 50
    p = torch.ones(n, dtype=torch.bfloat16, device=DEVICE)
    nearest = p.clone()
    g = torch.ones_like(p)
    states = [(torch.zeros(n, device=DEVICE), torch.zeros(n, device=DEVICE), torch.zeros((), device=DEVICE))
              for _ in range(2)]
    seed = torch.tensor(2024, device=DEVICE)
    for _ in range(steps):
        for param, (m, v, step), rounding in zip((p, nearest), states, (True, False)):
            options = AdamWOptions(lr=lr, betas=(0.0, 0.0), eps=0.0, weight_decay=0.0, stochastic_rounding=rounding)
            kernels.multi_tensor_adamw_(
                Bucket([param], [g], [m], [v], [step], rounding_seeds=[seed] if rounding else None), options)
    assert torch.equal(nearest, torch.ones_like(nearest))
    mean = p.double().mean().item()
    # The mean of n independent roundings (each within one ulp) is within a few 2^-8/sqrt(n) of exact.
    assert abs(mean - (1.0 - steps * lr)) < 1e-4, mean
    assert p.unique().numel() > 1


def test_int64_offsets_beyond_2_to_the_31_elements():
    n = 2**31 + 4099
    if torch.cuda.get_device_properties(0).total_memory < 4 * 2 * n + (8 << 30):
        pytest.skip("needs about 26 GB of GPU memory for four bf16 tensors of 2^31 elements")
    block_size = 4096
    p = torch.randn(n, dtype=torch.bfloat16, device=DEVICE)
    g = torch.randn(n, dtype=torch.bfloat16, device=DEVICE)
    m = torch.zeros(n, dtype=torch.bfloat16, device=DEVICE)
    v = torch.zeros(n, dtype=torch.bfloat16, device=DEVICE)
    step = torch.zeros((), device=DEVICE)
    # Blocks are independent: check the first block and the last three against the reference.
    tail_start = (n // block_size - 2) * block_size
    windows = [slice(0, block_size), slice(tail_start, n)]
    before = [(p[w].clone(), g[w].clone()) for w in windows]
    selections = [torch.zeros(n, dtype=torch.bool, device=DEVICE)]
    options = AdamWOptions(fraction=0.1, block_size=block_size, **HYPER)
    kernels.multi_tensor_adamw_(Bucket([p], [g], [m], [v], [step], selections=selections), options)
    for w, (p0, g0) in zip(windows, before):
        zeros = torch.zeros_like(p0, dtype=torch.float32)
        want = reference.adamw_math(p0, g0, zeros, zeros, None, step=1, options=options)
        assert torch.equal(selections[0][w], reference.selection_mask(m[w].float(), 0.1, block_size))
        torch.testing.assert_close(p[w].float(), want.param.bfloat16().float(), rtol=2**-7, atol=2**-7 * HYPER["lr"])
