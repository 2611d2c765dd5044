"""state_dict: interchangeable with torch.optim.AdamW both ways, exact resume, checked loads."""

import copy
import io
import os

import pytest
import torch

import selopt
from selopt import functional

INTERPRETED_KERNELS = os.environ.get("TRITON_INTERPRET") == "1" and functional.triton_problem() is None


def make_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).to(dtype)


def train(model, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 6, generator=gen).to(dtype)).pow(2).mean().backward()
        opt.step()


def through_bytes(state_dict):
    """A save and a load, as a checkpoint on disk would do."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def assert_same_params(a, b):
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)


def assert_resume_continues_the_run(make_first, make_second, steps):
    """Train with make_first, checkpoint, go on; a resume with make_second from the checkpoint must match bit for bit."""
    uninterrupted = make_model()
    opt = make_first(uninterrupted.parameters())
    train(uninterrupted, opt, steps, seed=1)
    model_ckpt, opt_ckpt = through_bytes(uninterrupted.state_dict()), through_bytes(opt.state_dict())
    train(uninterrupted, opt, steps, seed=2)

    resumed = make_model(seed=99)
    resumed.load_state_dict(model_ckpt)
    resumed_opt = make_second(resumed.parameters())
    resumed_opt.load_state_dict(opt_ckpt)
    train(resumed, resumed_opt, steps, seed=2)
    assert_same_params(resumed, uninterrupted)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: selopt.MoFO(ps, lr=1e-2, fraction=0.3, amsgrad=True),
        lambda ps: selopt.MoFO(ps, lr=1e-2, fraction=0.3, block_size=8, decay="selected"),
        lambda ps: selopt.AdamW(ps, lr=1e-2),
    ],
    ids=["mofo-amsgrad", "mofo-block", "adamw"],
)
def test_resume_equals_uninterrupted_run_bit_for_bit(make_opt):
    assert_resume_continues_the_run(make_opt, make_opt, steps=6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_stochastic_rounding_resumes_bit_for_bit(backend):
    # Each param's rounding seed is in its state: a resumed run draws what the uninterrupted one
    # drew, whatever torch's global generator does meanwhile.
    if backend == "triton" and not INTERPRETED_KERNELS:
        pytest.skip("the kernels on CPU need TRITON_INTERPRET=1 and a usable Triton")

    def make(params):
        return selopt.MoFO(params, lr=1e-2, fraction=0.5, stochastic_rounding=True, backend=backend)

    uninterrupted = make_model(torch.bfloat16)
    opt = make(uninterrupted.parameters())
    train(uninterrupted, opt, 3, seed=1)
    model_ckpt, opt_ckpt = through_bytes(uninterrupted.state_dict()), through_bytes(opt.state_dict())
    torch.manual_seed(123)
    train(uninterrupted, opt, 3, seed=2)

    resumed = make_model(torch.bfloat16, seed=99)
    resumed.load_state_dict(model_ckpt)
    resumed_opt = make(resumed.parameters())
    resumed_opt.load_state_dict(opt_ckpt)
    torch.manual_seed(456)
    train(resumed, resumed_opt, 3, seed=2)
    assert_same_params(resumed, uninterrupted)
    seeds = [int(opt.state[p]["rounding_seed"]) for p in uninterrupted.parameters()]
    assert len(set(seeds)) == len(seeds)  # every tensor rounds with its own stream


@pytest.mark.parametrize("direction", ["torch->selopt", "selopt->torch"])
# On CPU, backend="auto" is torch's fused kernel and backend="torch" its for-loop, each bit for bit.
@pytest.mark.parametrize(("torch_implementation", "backend"), [("foreach", "torch"), ("fused", "auto")])
def test_state_dict_moves_between_torch_adamw_and_selopt(direction, torch_implementation, backend):
    options = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
    implementation = dict(fused=True) if torch_implementation == "fused" else dict(foreach=False)
    make_torch = lambda ps: torch.optim.AdamW(ps, **implementation, **options)
    # The flag rides in the saved groups, where torch's load reads it: it must name the same implementation.
    make_selopt = lambda ps: selopt.AdamW(ps, backend=backend, **implementation, **options)
    first, second = (make_torch, make_selopt) if direction == "torch->selopt" else (make_selopt, make_torch)

    assert_resume_continues_the_run(first, second, steps=5)


def test_torch_state_dict_gets_selopt_defaults_for_missing_group_keys():
    model = make_model()
    torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(model, torch_opt, 1, seed=0)
    opt = selopt.MoFO(model.parameters(), fraction=0.2, block_size=64)
    opt.load_state_dict(through_bytes(torch_opt.state_dict()))
    group = opt.param_groups[0]
    assert group["fraction"] == 0.2 and group["block_size"] == 64 and group["backend"] == "auto"
    assert group["lr"] == 1e-3  # saved values win over the constructor's
    train(model, opt, 1, seed=1)


def test_fp32_moments_of_bf16_params_stay_fp32_and_exact_through_a_load():
    model = make_model(torch.bfloat16)
    opt = selopt.MoFO(model.parameters(), lr=1e-2, fraction=0.5)
    train(model, opt, 3, seed=0)
    saved = through_bytes(opt.state_dict())
    fresh = selopt.MoFO(model.parameters(), lr=1e-2, fraction=0.5)
    fresh.load_state_dict(saved)
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            assert fresh.state[p][key].dtype == torch.float32
            assert torch.equal(fresh.state[p][key], opt.state[p][key])
    # torch's own load rounds them to bf16: that is the behaviour being overridden.
    torch_opt = torch.optim.AdamW(model.parameters())
    torch_opt.load_state_dict(through_bytes(opt.state_dict()))
    assert torch_opt.state[next(model.parameters())]["exp_avg"].dtype == torch.bfloat16


def test_bf16_moments_saved_by_torch_are_widened_exactly():
    model = make_model(torch.bfloat16)
    torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, torch_opt, 2, seed=0)
    opt = selopt.AdamW(model.parameters(), lr=1e-2)
    opt.load_state_dict(through_bytes(torch_opt.state_dict()))
    p = next(model.parameters())
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt.state[p]["exp_avg"], torch_opt.state[p]["exp_avg"].float())


def test_mismatched_state_dict_raises_and_changes_nothing():
    model = make_model()
    opt = selopt.MoFO(model.parameters(), lr=1e-2)
    train(model, opt, 2, seed=0)
    before = copy.deepcopy(opt.state_dict())
    bad = through_bytes(opt.state_dict())
    bad["state"][0]["exp_avg"] = torch.zeros(3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"state_dict\['state'\]\[0\]\['exp_avg'\] has shape \(3, 3\), but its param has shape \(8, 6\)"):
        opt.load_state_dict(bad)
    other = selopt.MoFO(make_model().parameters())
    with pytest.raises(ValueError, match="params"):
        other.load_state_dict({"state": {}, "param_groups": [{**before["param_groups"][0], "params": [0, 1]}]})
    after = opt.state_dict()
    for key in before["state"]:
        for name, value in before["state"][key].items():
            assert torch.equal(after["state"][key][name], value)
