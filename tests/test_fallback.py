"""A kernel that cannot compile, or a Triton that is too old: "auto" falls back, "triton" refuses.

The compile failure is forced (the kernels compile fine): under the
interpreter nothing is compiled, so the test replaces the compile step with
one that fails for the chosen kernels, exactly where a real compile would.
"""

from __future__ import annotations

import os

import pytest
import torch

import selopt
from selopt import functional
from selopt.options import AdamWOptions

triton = pytest.importorskip("triton", reason="the fallback wraps the Triton kernels (pip install 'selopt[triton]')")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device: run with TRITON_INTERPRET=1 to run the kernels on CPU", allow_module_level=True)

from selopt.kernels import adamw, launch  # noqa: E402  (after the skip: importing needs a usable Triton)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def failing_compile(monkeypatch):
    """Make every launch of a bf16-param bucket fail to compile (the name of its last kernel)."""
    real = launch.compile_launches

    def compile_launches(launches, device):
        last = launches[-1]
        if last.constexprs["PARAM_DTYPE"] == triton.language.bfloat16:
            raise launch.KernelCompileError(last.name, last.constexprs, "cuda:90",
                                            NameError("Cannot access global variable X"))
        real(launches, device)

    monkeypatch.setattr(adamw, "compile_launches", compile_launches)
    # backend="auto" picks the kernels for CUDA tensors only; on CPU the interpreter stands in.
    monkeypatch.setattr(functional, "AUTO_KERNEL_DEVICES", ("cuda", "cpu"))


def mixed_model():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"wide": torch.nn.Linear(24, 16), "narrow": torch.nn.Linear(16, 8)}).to(DEVICE)
    model["narrow"].to(torch.bfloat16)
    return model


def train(model, opt, steps):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, 24, generator=gen).to(DEVICE)
        loss = model["narrow"](model["wide"](x).bfloat16()).float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("block_size", [None, 64], ids=["exact", "one-pass"])
def test_auto_falls_back_for_the_failing_bucket_only_with_one_warning(failing_compile, block_size):
    options = dict(lr=1e-2, fraction=0.3, block_size=block_size)
    model, reference_model = mixed_model(), mixed_model()
    opt = selopt.MoFO(model.parameters(), backend="auto", **options)
    with pytest.warns(RuntimeWarning) as caught:
        train(model, opt, 3)
    messages = [str(w.message) for w in caught if "selopt runs its torch reference" in str(w.message)]
    assert len(messages) == 1
    assert "torch.bfloat16 params" in messages[0] and "NameError" in messages[0]
    assert "python -m selopt.check" in messages[0]  # how to report it

    train(reference_model, selopt.MoFO(reference_model.parameters(), backend="torch", **options), 3)
    # The bf16 bucket ran the reference from an untouched state: bit for bit. The fp32 bucket ran
    # the kernels: within the kernels' tolerance.
    for p, q in zip(model["narrow"].parameters(), reference_model["narrow"].parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model["wide"].parameters(), reference_model["wide"].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert not torch.equal(p, torch.zeros_like(p))


@pytest.mark.parametrize("grouping", ["one group", "a group per layer"])
def test_triton_backend_raises_the_compile_error_before_anything_moves(failing_compile, grouping):
    model = mixed_model()
    groups = ([{"params": model.parameters()}] if grouping == "one group"
              else [{"params": model["wide"].parameters()}, {"params": model["narrow"].parameters()}])
    opt = selopt.MoFO(groups, lr=1e-2, backend="triton")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(launch.KernelCompileError, match=r"_exact_update_kernel failed to compile .* NameError"):
        train(model, opt, 1)
    # Both buckets (fp32, which compiles, and bf16, which does not) are untouched, in one group or two.
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    assert not opt.state  # not even a fresh state is left behind


def test_a_triton_older_than_supported_is_reported(monkeypatch):
    monkeypatch.setattr(triton, "__version__", "3.5.1")
    assert "Triton 3.5.1 is older than 3.6" in functional.triton_problem.__wrapped__()
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    assert functional.triton_problem.__wrapped__() is None


def test_old_triton_auto_warns_once_per_optimizer_and_uses_torch_triton_refuses(monkeypatch):
    problem = "Triton 3.2.0 is older than 3.6, the oldest selopt supports"
    monkeypatch.setattr(functional, "triton_problem", lambda: problem)
    cuda = torch.device("cuda")

    def choose(backend, warn):
        return functional.choose_implementation(cuda, torch.float32, torch.float32, sharded=False,
                                                options=AdamWOptions(backend=backend), warn=warn).name
    reasons = []
    assert choose("auto", reasons.append) == "torch" and [problem in r for r in reasons] == [True]
    with pytest.raises(ImportError, match=r"backend='triton' cannot run: Triton 3.2.0 .* backend='auto'"):
        choose("triton", reasons.append)
    # An optimizer says it once, however many steps and buckets meet it.
    monkeypatch.setattr(functional, "AUTO_KERNEL_DEVICES", ("cuda", "cpu"))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt = selopt.AdamW([{"params": model[0].parameters()}, {"params": model[1].parameters()}], backend="auto")
    with pytest.warns(RuntimeWarning, match="3.2.0 is older than 3.6") as caught:
        for _ in range(3):
            model(torch.randn(2, 4)).sum().backward()
            opt.step()
    assert len([w for w in caught if "older than" in str(w.message)]) == 1
