"""HFT: per-layer counts, seeded draws, report numbers, frozen tensors that stay put, and safe stage switches."""

import pytest
import torch
from torch import nn

import selopt
import selopt.hf
from bench.tiny_llama import TinyLlama, TinyLlamaConfig
from selopt.hft import freeze_half, next_stage

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")


def tiny(n_layers=4, seed=0):
    torch.manual_seed(seed)
    return TinyLlama(TinyLlamaConfig(vocab_size=24, dim=16, n_layers=n_layers, n_heads=2, ffn_dim=24, max_seq_len=8))


def trained_members(model, layer, members):
    params = dict(model.named_parameters())
    out = []
    for member in members:
        (name,) = [n for n in params if f"layers.{layer}." in n and f".{member}." in n]
        if params[name].requires_grad:
            out.append(member)
    return out


@pytest.mark.parametrize("n_layers", [1, 3, 4, 7])
@pytest.mark.parametrize("seed", [0, 1, 5])
def test_counts_per_layer_and_category(n_layers, seed):
    model = tiny(n_layers)
    report = freeze_half(model, seed=seed)
    ffn_counts = []
    for layer in range(n_layers):
        assert len(trained_members(model, layer, ATTENTION)) == 2
        assert len(trained_members(model, layer, NORMS)) == 1
        ffn = trained_members(model, layer, FFN)
        assert len(ffn) in (1, 2)
        ffn_counts.append(len(ffn))
        # The report says the same as requires_grad.
        assert report.layers[layer]["attention"] == trained_members(model, layer, ATTENTION)
        assert report.layers[layer]["ffn"] == ffn
    # Half of the layers train 2 FFN projections, the other half 1 (odd depth: one side gets the extra layer).
    assert ffn_counts.count(2) in {n_layers // 2, (n_layers + 1) // 2}
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert dict(model.named_parameters())[name].requires_grad


def test_report_fractions_and_names():
    model = tiny()
    report = freeze_half(model, seed=3)
    params = dict(model.named_parameters())
    assert sorted(report.trainable) == sorted(n for n, p in params.items() if p.requires_grad)
    assert sorted(report.frozen) == sorted(n for n, p in params.items() if not p.requires_grad)
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    total = sum(p.numel() for p in params.values())
    assert report.trainable_numel == trainable and report.total_numel == total
    assert report.fraction_by_count == pytest.approx(trainable / total)
    assert 0.4 < report.fraction_by_count < 0.8  # half of the layers plus embeddings and head
    assert "layer 0" in str(report)


def test_fraction_by_bytes_counts_dtypes():
    model = tiny()
    model.lm_head.to(torch.float64)  # the head trains: its bytes weigh double
    report = freeze_half(model, seed=0)
    assert report.total_bytes == sum(p.numel() * p.element_size() for p in model.parameters())
    assert report.fraction_by_bytes > report.fraction_by_count


def test_same_seed_same_draw_new_seed_new_draw():
    first = freeze_half(tiny(), seed=11)
    again = freeze_half(tiny(), seed=11)
    other = freeze_half(tiny(), seed=12)
    assert first.layers == again.layers and first.trainable == again.trainable
    assert first.layers != other.layers


def test_new_stage_redraws_on_the_same_model():
    model = tiny()
    stage1 = freeze_half(model, seed=0)
    stage2 = freeze_half(model, seed=1)
    # Tensors frozen in stage 1 can train in stage 2: requires_grad is set both ways.
    assert set(stage1.frozen) & set(stage2.trainable)
    assert sorted(stage2.trainable) == sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_frozen_tensors_unchanged_after_training():
    model = tiny()
    report = freeze_half(model, seed=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = selopt.AdamW(selopt.param_groups(model, weight_decay=0.1, fraction=1.0), lr=1e-2, backend="torch")
    ids = torch.randint(0, 24, (4, 8))
    for _ in range(3):
        logits = model(ids[:, :-1])
        nn.functional.cross_entropy(logits.reshape(-1, 24), ids[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    params = dict(model.named_parameters())
    for name in report.frozen:
        assert params[name].grad is None
        assert torch.equal(params[name], before[name]), name
    for name in report.trainable:
        assert not torch.equal(params[name], before[name]), name


class GPT2ishBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(8), nn.LayerNorm(8)
        self.attn = nn.ModuleDict({"c_attn": nn.Linear(8, 24), "c_proj": nn.Linear(8, 8)})
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(8, 32), "c_proj": nn.Linear(32, 8)})


def test_custom_patterns_for_other_names():
    model = nn.Module()
    model.transformer = nn.Module()
    model.transformer.wte = nn.Embedding(10, 8)
    model.transformer.h = nn.ModuleList(GPT2ishBlock() for _ in range(4))
    patterns = {"attention": [r"attn\.c_attn", r"attn\.c_proj"], "ffn": [r"mlp\.c_fc", r"mlp\.c_proj"], "norm": ["ln_1", "ln_2"]}
    report = freeze_half(model, seed=0, patterns=patterns)
    for layer in range(4):
        assert {cat: len(members) for cat, members in report.layers[layer].items()} == {"attention": 1, "ffn": 1, "norm": 1}
        block = model.transformer.h[layer]
        # weight and bias of a module are chosen together
        for module in (block.attn["c_attn"], block.mlp["c_fc"], block.ln_1):
            assert module.weight.requires_grad == module.bias.requires_grad
    assert model.transformer.wte.weight.requires_grad


def test_errors():
    with pytest.raises(ValueError, match="no parameter of the model matches"):
        freeze_half(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(TypeError, match="seed"):
        freeze_half(tiny(), seed="0")
    with pytest.raises(TypeError, match="patterns"):
        freeze_half(tiny(), patterns={"attention": "q_proj"})
    with pytest.raises(ValueError, match="several patterns"):
        freeze_half(tiny(), patterns={"a": ["q_proj"], "b": ["q_proj|k_proj"]})
    with pytest.raises(ValueError, match="layer_pattern"):
        freeze_half(tiny(), layer_pattern=r"layers\.")


# ---------------------------------------------------------------- stages


def _train(model, opt, steps=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 24, (4, 8), generator=gen)
        logits = model(ids[:, :-1])
        nn.functional.cross_entropy(logits.reshape(-1, 24), ids[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()


def _held(opt):
    return [p for group in opt.param_groups for p in group["params"]]


def test_refreezing_with_the_old_optimizer_is_the_trap_next_stage_avoids():
    trapped, safe = tiny(), tiny()
    for model, redraw in ((trapped, lambda m, o: freeze_half(m, seed=1)), (safe, lambda m, o: next_stage(m, o, seed=1))):
        freeze_half(model, seed=0)
        opt = selopt.AdamW(selopt.param_groups(model, weight_decay=0.0, fraction=1.0), lr=1e-2, backend="torch")
        _train(model, opt)
        stage2 = redraw(model, opt)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        _train(model, opt, seed=1)
        untrained = [n for n, p in model.named_parameters() if n in stage2.trainable and torch.equal(p, before[n])]
        if model is trapped:
            assert untrained  # unfrozen by the new draw, never stepped: what the issue reported
        else:
            assert untrained == []
            assert {id(p) for p in _held(opt)} == {id(p) for p in model.parameters() if p.requires_grad}
            for name, param in model.named_parameters():
                if name in stage2.frozen:
                    assert torch.equal(param, before[name]) and param not in opt.state


def test_new_params_join_the_group_of_their_kind():
    model = tiny()
    freeze_half(model, seed=0)
    opt = selopt.MoFO(selopt.param_groups(model, weight_decay=0.1, fraction=0.2), lr=1e-2)
    next_stage(model, opt, seed=1)
    selective, dense = opt.param_groups
    assert all(p.dim() == 2 for p in selective["params"]) and all(p.dim() == 1 for p in dense["params"])
    assert (selective["fraction"], dense["fraction"], dense["weight_decay"]) == (0.2, 1.0, 0.0)
    assert {id(p) for p in _held(opt)} == {id(p) for p in model.parameters() if p.requires_grad}

    hf_model = tiny()
    freeze_half(hf_model, seed=0)
    opt = selopt.MoFO(selopt.hf.trainer_param_groups(hf_model, weight_decay=0.1), lr=1e-2)
    next_stage(hf_model, opt, seed=1)
    no_decay = selopt.hf.no_decay_parameter_names(hf_model)
    names = {id(p): n for n, p in hf_model.named_parameters()}
    assert [sorted(names[id(p)] in no_decay for p in g["params"]) for g in opt.param_groups] == [
        [False] * len(opt.param_groups[0]["params"]), [True] * len(opt.param_groups[1]["params"])]

    single = tiny()
    freeze_half(single, seed=0)
    opt = torch.optim.AdamW([p for p in single.parameters() if p.requires_grad], lr=1e-2)  # any optimizer
    next_stage(single, opt, seed=1)
    assert {id(p) for p in _held(opt)} == {id(p) for p in single.parameters() if p.requires_grad}


def test_ambiguous_groups_need_group_of_and_nothing_changes_before():
    model = tiny()
    freeze_half(model, seed=0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    matrices = [p for p in trainable if p.dim() >= 2]
    # Two groups of matrices (e.g. another lr for the embeddings): where would a new q_proj go?
    groups = [{"params": matrices[:1], "lr": 1e-3}, {"params": matrices[1:]},
              {"params": [p for p in trainable if p.dim() < 2], "fraction": 1.0}]
    opt = selopt.MoFO(groups, lr=1e-2)
    _train(model, opt, steps=1)
    flags = [p.requires_grad for p in model.parameters()]
    held = [list(g["params"]) for g in opt.param_groups]
    for bad, error in (({}, "cannot tell which param group"), ({"group_of": lambda n, p: 7}, r"group index in \[0, 3\)"),
                       ({"group_of": "first"}, "group_of must be"), ({"keep_state": 1}, "keep_state")):
        with pytest.raises((ValueError, TypeError), match=error):
            next_stage(model, opt, seed=1, **bad)
        assert [p.requires_grad for p in model.parameters()] == flags
        assert [list(g["params"]) for g in opt.param_groups] == held and len(opt.state) == len(trainable)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        next_stage(model, object(), seed=1)

    next_stage(model, opt, seed=1, group_of=lambda name, param: 1 if param.dim() >= 2 else 2)
    assert {id(p) for p in _held(opt)} == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("keep_state", [False, True])
def test_state_of_a_new_stage(keep_state):
    model = tiny()
    stage1 = freeze_half(model, seed=0)
    opt = selopt.AdamW(selopt.param_groups(model, fraction=1.0), lr=1e-2, backend="torch")
    params = dict(model.named_parameters())
    for name in stage1.trainable:
        if ".mlp." in name:
            opt.set_soft_mask(params[name], torch.full(params[name].shape[:1], 0.5))
    _train(model, opt)
    stage2 = next_stage(model, opt, seed=1, keep_state=keep_state)
    both = set(stage1.trainable) & set(stage2.trainable)
    for name, param in params.items():
        if name in stage2.frozen:
            assert param not in opt.state and param not in opt._soft_masks
        elif name in both:
            assert (float(opt.state[param]["step"]) == 2) if keep_state else param not in opt.state
    # The next stage trains, and an lr scheduler built in stage 1 still drives every group.
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    _train(model, opt, steps=1)
    scheduler.step()
    assert all(float(opt.state[params[name]]["step"]) == (3 if keep_state and name in both else 1)
               for name in stage2.trainable)
    assert [g["lr"] for g in opt.param_groups] == [5e-3, 5e-3]


def test_named_param_groups_keep_their_names():
    model = tiny()
    freeze_half(model, seed=0)
    opt = selopt.AdamW([(n, p) for n, p in model.named_parameters() if p.requires_grad], lr=1e-2)
    next_stage(model, opt, seed=1)
    group = opt.param_groups[0]
    names = {id(p): n for n, p in model.named_parameters()}
    assert group["param_names"] == [names[id(p)] for p in group["params"]]
    assert sorted(group["param_names"]) == sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_three_stages_sft_dpo_task():
    model = tiny()
    draws = [freeze_half(model, seed=0)]
    opt = selopt.MoFO(selopt.param_groups(model, weight_decay=0.0, fraction=0.5), lr=1e-2, backend="torch")
    for seed in (1, 2):
        _train(model, opt)
        draws.append(next_stage(model, opt, seed=seed))
    assert len({tuple(sorted(d.trainable)) for d in draws}) == 3
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, opt)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) == (name in draws[-1].frozen), name
