"""HFT: per-layer counts, seeded draws, report numbers, and frozen tensors that stay put."""

import pytest
import torch
from torch import nn

import selopt
from bench.tiny_llama import TinyLlama, TinyLlamaConfig
from selopt.hft import freeze_half

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
