"""Traps in the API that used to pass silently: param groups that overrode the optimizer's arguments,
wrappers (accelerate, Trainer) that hid the selopt optimizer, and options that do nothing."""

from __future__ import annotations

import warnings

import pytest
import torch

import selopt
import selopt.hf


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 10), torch.nn.LayerNorm(10), torch.nn.Linear(10, 4, bias=False))


def _moved(opt, model) -> list[float]:
    """Fraction of each group's entries that the next step moves."""
    opt.track_updates()
    model(torch.randn(5, 8)).square().sum().backward()
    opt.step()
    return [counts.fraction for counts in opt.update_stats().groups]


# ---------------------------------------------------------------- param_groups


@pytest.mark.parametrize("make_groups", [selopt.param_groups, selopt.hf.trainer_param_groups])
def test_param_groups_leave_fraction_and_weight_decay_to_the_optimizer(make_groups):
    model = _model()
    # selopt.AdamW over param_groups is AdamW: every entry moves.
    opt = selopt.AdamW(make_groups(model, weight_decay=0.0), lr=1e-2, backend="torch")
    assert [(g["fraction"], g["weight_decay"]) for g in opt.param_groups] == [(1.0, 0.0), (1.0, 0.0)]
    assert _moved(opt, model) == [1.0, 1.0]

    # The optimizer's fraction and weight decay reach the matrices; the vectors stay dense without decay.
    opt = selopt.MoFO(make_groups(model), lr=1e-2, fraction=0.3, weight_decay=0.0, backend="torch")
    assert [(g["fraction"], g["weight_decay"]) for g in opt.param_groups] == [(0.3, 0.0), (1.0, 0.0)]
    assert _moved(opt, model) == [pytest.approx(0.3), 1.0]  # floor(0.3 * n) of each matrix: 24 of 80, 12 of 40

    # Given explicitly, they override the optimizer's, on the matrices only.
    groups = make_groups(model, weight_decay=0.1, fraction=0.2, block_size=64)
    opt = selopt.AdamW(groups, lr=1e-2, fraction=0.9, weight_decay=0.0)
    assert [(g["fraction"], g["weight_decay"], g["block_size"]) for g in opt.param_groups] == [
        (0.2, 0.1, 64), (1.0, 0.0, None)]


@pytest.mark.parametrize("make_groups", [selopt.param_groups, selopt.hf.trainer_param_groups])
def test_param_groups_want_a_module(make_groups):
    model = _model()
    name = make_groups.__name__
    for not_a_module in (model.parameters(), list(model.parameters()), model.named_parameters(), None):
        with pytest.raises(TypeError, match=rf"{name} wants the model, an nn.Module .* got \w+: pass `model`, "
                                            r"not `model.parameters\(\)`"):
            make_groups(not_a_module)


# ---------------------------------------------------------------- wrappers


@pytest.fixture
def accelerator():
    accelerate = pytest.importorskip("accelerate", reason="accelerate is not installed (pip install 'selopt[hf]')")
    yield accelerate.Accelerator(cpu=True)
    # accelerate keeps its state process-wide: leave none behind for Trainer in later tests.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def test_unwrap_reaches_selopt_through_accelerate(accelerator):
    model = _model()
    opt = selopt.MoFO(model.parameters(), lr=1e-2, fraction=0.5)
    wrapped = accelerator.prepare(opt)
    assert type(wrapped).__name__ == "AcceleratedOptimizer"
    assert not hasattr(wrapped, "update_stats")  # what a user meets without unwrap
    assert selopt.unwrap(wrapped) is opt and selopt.unwrap(opt) is opt
    selopt.unwrap(wrapped).track_updates()
    model(torch.randn(5, 8)).square().sum().backward()
    wrapped.step()
    assert selopt.unwrap(wrapped).update_stats().groups[0].moved > 0


def test_wrapped_errors_name_the_inner_optimizer(accelerator):
    model = _model()
    wrapped = accelerator.prepare(torch.optim.AdamW(model.parameters()))
    with pytest.raises(TypeError, match=r"got torch\.optim\.adamw\.AdamW$"):
        selopt.unwrap(wrapped)
    with pytest.raises(TypeError, match=r"UpdateStatsCallback needs a selopt optimizer .* Trainer has "
                                        r"torch\.optim\.adamw\.AdamW$"):
        selopt.hf.UpdateStatsCallback().on_train_begin(None, None, None, optimizer=wrapped, model=model)
    with pytest.raises(TypeError, match=r"set_soft_mask, got torch\.optim\.adamw\.AdamW$"):
        selopt.cofi.attach_soft_masks(wrapped, model, None)


def test_unwrap_reaches_through_a_wrapper_that_takes_the_inner_class():
    opt = selopt.AdamW(_model().parameters(), lr=1e-2)

    class Mimic:  # as Lightning's LightningOptimizer: an instance of the wrapped class, stepping the inner one
        def __init__(self, optimizer):
            self.__class__ = type("Lightning" + type(optimizer).__name__, (Mimic, type(optimizer)), {})
            self._optimizer = optimizer

        @property
        def optimizer(self):
            return self._optimizer

    wrapped = Mimic(opt)
    assert isinstance(wrapped, selopt.AdamW)
    assert selopt.unwrap(wrapped) is opt


def test_unwrap_ends_at_a_wrapper_that_names_itself():
    class Loop:
        @property
        def optimizer(self):
            return self

    with pytest.raises(TypeError, match="got .*Loop"):
        selopt.unwrap(Loop())


def test_callback_and_soft_masks_reach_selopt_through_accelerate(accelerator):
    from bench.tiny_llama import TinyLlama, TinyLlamaConfig

    torch.manual_seed(0)
    model = TinyLlama(TinyLlamaConfig(vocab_size=24, dim=16, n_layers=1, n_heads=2, ffn_dim=24, max_seq_len=8))
    opt = selopt.AdamW(model.parameters(), lr=1e-2)
    wrapped = accelerator.prepare(opt)
    callback = selopt.hf.UpdateStatsCallback()
    callback.on_train_begin(None, None, None, optimizer=wrapped, model=model)
    assert callback._optimizer is opt and opt._update_tracker is not None
    scores = selopt.cofi.importance(model, [torch.randint(0, 24, (2, 8))], progress=False)
    assert "model.layers.0.mlp.up_proj.weight" in selopt.cofi.attach_soft_masks(wrapped, model, scores)
    assert model.model.layers[0].mlp.up_proj.weight in opt._soft_masks


# ---------------------------------------------------------------- options that do nothing


def _step(opt, params):
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()


def test_stochastic_rounding_without_bf16_params_warns_once_per_group():
    fp32 = [torch.nn.Parameter(torch.randn(4, 4))]
    bf16 = [torch.nn.Parameter(torch.randn(4, 4).bfloat16())]
    opt = selopt.AdamW([{"params": bf16}, {"params": fp32}], lr=1e-2, stochastic_rounding=True, backend="torch")
    with pytest.warns(UserWarning) as record:
        _step(opt, bf16 + fp32)
    assert [str(w.message) for w in record] == [
        "stochastic_rounding=True does nothing in param group 1: it rounds bfloat16 params only, and this "
        "group's params are float32"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(opt, bf16 + fp32)  # once per group: the next steps stay quiet
        _step(selopt.AdamW(bf16, lr=1e-2, stochastic_rounding=True, backend="torch"), bf16)


def test_soft_mask_mode_without_a_mask_warns_once_per_group():
    masked, plain = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(3, 4))
    opt = selopt.AdamW([{"params": [masked]}, {"params": [plain]}], lr=1e-2, soft_mask_mode="grad")
    opt.set_soft_mask(masked, torch.tensor([1.0, 0.5, 0.0]))
    with pytest.warns(UserWarning, match=r"^soft_mask_mode='grad' does nothing in param group 1: none of its params "
                                         r"has a soft mask") as record:
        _step(opt, [masked, plain])
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(opt, [masked, plain])
        # The default mode says nothing: without a mask it is simply the plain step.
        _step(selopt.AdamW([plain], lr=1e-2), [plain])


def test_the_idle_option_check_looks_once_per_group():
    params = [torch.nn.Parameter(torch.randn(4, 4))]
    opt = selopt.AdamW(params, lr=1e-2, soft_mask_mode="grad", backend="torch")
    with pytest.warns(UserWarning, match="soft_mask_mode"):
        _step(opt, params)
    opt._soft_masks = _CountingMasks()  # still no mask; now each look at the masks is counted
    for _ in range(3):
        _step(opt, params)
    assert opt._soft_masks.looks == 0


class _CountingMasks(dict):
    looks = 0

    def __contains__(self, key):
        self.looks += 1
        return super().__contains__(key)
