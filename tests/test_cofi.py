"""CoFiTune: coarse presets, the search helper, unit importance, and soft masks in both backends."""

import os

import pytest
import torch
from torch import nn

import selopt
from bench.tiny_llama import TinyLlama, TinyLlamaConfig
from selopt import cofi, reference
from selopt.options import AdamWOptions


def tiny(n_layers=4, dim=16, heads=2, ffn=24, seed=0):
    torch.manual_seed(seed)
    return TinyLlama(TinyLlamaConfig(vocab_size=24, dim=dim, n_layers=n_layers, n_heads=heads, ffn_dim=ffn, max_seq_len=8))


@pytest.mark.parametrize(
    "n_layers, layers, expected",
    [
        (8, "bottom1", [0, 1]),
        (8, "bottom2", [2, 3]),
        (8, "middle", [4, 5]),
        (8, "top", [6, 7]),
        (8, "bottom_half", [0, 1, 2, 3]),
        (8, "top_half", [4, 5, 6, 7]),
        (4, "bottom2", [1]),
        (5, "top", [3, 4]),
        (5, (1, 4), [1, 2, 3]),
        (5, range(0, 1), [0]),
    ],
)
def test_freeze_coarse_selects_the_span(n_layers, layers, expected):
    model = tiny(n_layers)
    report = cofi.freeze_coarse(model, layers=layers)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    want = sorted(f"model.layers.{i}.mlp.{m}.weight" for i in expected for m in ("up_proj", "down_proj"))
    assert trainable == want == sorted(report.trainable)
    assert sorted(report.layers) == expected
    assert not model.model.embed_tokens.weight.requires_grad and not model.lm_head.weight.requires_grad


def test_layer_range_at_llama_depth():
    assert cofi.layer_range("bottom2", 32) == range(8, 16)
    assert cofi.layer_range("top", 40) == range(30, 40)


def test_freeze_coarse_other_modules_and_errors():
    model = tiny(4)
    report = cofi.freeze_coarse(model, layers="top", modules=("q_proj", "o_proj"))
    assert report.trainable == ["model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.o_proj.weight"]
    with pytest.raises(ValueError, match="layers must be one of"):
        cofi.freeze_coarse(model, layers="bottom3")
    with pytest.raises(ValueError, match="selects no layer"):
        cofi.freeze_coarse(tiny(2), layers="bottom1")
    with pytest.raises(ValueError, match="0 <= start < stop <= 4"):
        cofi.freeze_coarse(model, layers=(2, 9))
    with pytest.raises(TypeError, match="modules"):
        cofi.freeze_coarse(model, modules="up_proj")
    with pytest.raises(ValueError, match="no parameter of the model matches"):
        cofi.freeze_coarse(model, modules=("c_fc",))
    # Nothing changed by the failed calls.
    assert report.trainable == [n for n, p in model.named_parameters() if p.requires_grad]


def test_search_ranks_by_weighted_score():
    table = {"bottom1": (0.9, 0.2), "bottom2": (0.7, 0.8), "top": (0.5, 0.7)}
    calls = []

    def train_and_score(config):
        calls.append(config["layers"])
        speciality, general = table[config["layers"]]
        return speciality, general  # the "trained" object is the versatility here

    ranked = cofi.search([{"layers": k} for k in table], train_and_score, lambda trained: trained)
    assert calls == list(table)
    assert [r.config["layers"] for r in ranked] == ["bottom2", "top", "bottom1"]
    assert ranked[0].score == pytest.approx(0.75)
    only_speciality = cofi.search([{"layers": k} for k in table], train_and_score, lambda t: t, weight=1.0)
    assert only_speciality[0].config["layers"] == "bottom1"
    with pytest.raises(ValueError, match="weight"):
        cofi.search([{"layers": "top"}], train_and_score, lambda t: t, weight=1.5)
    with pytest.raises(ValueError, match="keys among"):
        cofi.search([{"layer": "top"}], train_and_score, lambda t: t)
    with pytest.raises(ValueError, match="finite"):
        cofi.search([{"layers": "top"}], lambda c: (float("nan"), 0.0), lambda t: t)
    assert len(cofi.candidate_grid()) == 12


def batches(n=3, batch=4, seq=8, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 24, (batch, seq), generator=generator) for _ in range(n)]


@pytest.mark.parametrize("dim, heads, ffn", [(16, 2, 24), (24, 4, 37)])
def test_importance_shapes_and_range(dim, heads, ffn):
    model = tiny(3, dim=dim, heads=heads, ffn=ffn)
    model.eval()
    frozen = cofi.freeze_coarse(model, "bottom2").trainable
    probe = batches(1)[0]
    before = model(probe)
    torch.manual_seed(0)
    scores = cofi.importance(model, batches())
    for index in range(3):
        assert scores.ffn[index].shape == (ffn,)
        assert scores.hidden[index].shape == (dim,)
        assert scores.heads[index].shape == (heads,)
        for table in (scores.ffn, scores.hidden, scores.heads):
            assert table[index].dtype == torch.float32
            assert (table[index] >= 0).all() and (table[index] < 1).all()
        assert scores.ffn[index].std() > 0  # units are told apart
    # The model is left as it was: mode, requires_grad, no gradients, no hooks.
    assert not model.training
    assert [n for n, p in model.named_parameters() if p.requires_grad] == frozen
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(model(probe), before)


def test_importance_without_dropout_sees_no_difference():
    # Without dropout the two passes agree, the KL and its gradients are 0: nothing is important.
    scores = cofi.importance(tiny(2), batches(), dropout=0.0)
    assert all(float(t.abs().max()) == 0.0 for table in (scores.ffn, scores.hidden, scores.heads) for t in table.values())


def test_importance_is_seeded_and_takes_dict_batches():
    model = tiny(2)
    torch.manual_seed(3)
    first = cofi.importance(model, batches())
    torch.manual_seed(3)
    again = cofi.importance(model, [{"input_ids": b} for b in batches()])
    assert all(torch.equal(first.ffn[i], again.ffn[i]) for i in first.ffn)
    with pytest.raises(ValueError, match="dropout"):
        cofi.importance(model, batches(), dropout=1.0)
    with pytest.raises(ValueError, match="at least one batch"):
        cofi.importance(model, [])


def test_importance_removes_its_hooks_and_restores_the_mode_on_errors():
    model = tiny(2)
    model.eval()
    probe = batches(1)[0]
    before = model(probe)
    with pytest.raises(ValueError, match="at least one batch"):
        cofi.importance(model, [])
    with pytest.raises(ValueError, match="not divisible by num_heads=3"):
        cofi.importance(model, batches(), num_heads=3)
    assert not model.training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert torch.equal(model(probe), before)


def test_merge_save_load(tmp_path):
    model = tiny(2)
    torch.manual_seed(0)
    a = cofi.importance(model, batches(seed=1))
    b = cofi.importance(model, batches(seed=2))
    merged = a.merge(b)
    for kind in ("ffn", "hidden", "heads"):
        for index, table in getattr(merged, kind).items():
            assert torch.equal(table, torch.maximum(getattr(a, kind)[index], getattr(b, kind)[index]))
    path = tmp_path / "importance.pt"
    merged.save(path)
    loaded = cofi.Importance.load(path)
    assert all(torch.equal(loaded.hidden[i], merged.hidden[i]) for i in merged.hidden)
    other = cofi.importance(tiny(3), batches())
    with pytest.raises(ValueError, match="different layers"):
        cofi.merge_importance(a, other)


def soft_mask_setup(backend, mode="update"):
    model = tiny(2)
    cofi.freeze_coarse(model, "bottom_half")
    torch.manual_seed(0)
    scores = cofi.importance(model, batches())
    opt = selopt.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0, backend=backend)
    names = cofi.attach_soft_masks(opt, model, scores, mode=mode)
    return model, scores, opt, names


def train_steps(model, opt, steps=3):
    for batch in batches(steps, seed=7):
        logits = model(batch[:, :-1])
        nn.functional.cross_entropy(logits.reshape(-1, 24), batch[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("mode", ["update", "grad"])
def test_soft_masks_reach_the_reference(mode):
    model, scores, opt, names = soft_mask_setup("torch", mode)
    assert names == ["model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"]
    assert opt.param_groups[0]["soft_mask_mode"] == mode
    up = model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(opt._soft_masks[up], 1 - scores.ffn[0])
    assert torch.equal(opt._soft_masks[model.model.layers[0].mlp.down_proj.weight], 1 - scores.hidden[0])

    batch = batches(1, seed=7)[0]
    model(batch[:, :-1]).logsumexp(-1).mean().backward()
    options = AdamWOptions(lr=1e-2, weight_decay=0.0, soft_mask_mode=mode)
    expected = reference.adamw_math(up, up.grad, torch.zeros_like(up), torch.zeros_like(up), None, step=1,
                                    options=options, soft_mask=1 - scores.ffn[0]).param
    unmasked = reference.adamw_math(up, up.grad, torch.zeros_like(up), torch.zeros_like(up), None, step=1,
                                    options=options).param
    start = up.detach().clone()
    opt.step()
    torch.testing.assert_close(up.detach(), expected, rtol=0, atol=0)
    if mode == "update":  # the most important rows move least
        row_step = (up.detach() - start).abs().sum(1) / (unmasked - start).abs().sum(1)
        torch.testing.assert_close(row_step, 1 - scores.ffn[0], rtol=1e-5, atol=1e-6)


def test_attach_soft_masks_errors():
    model = tiny(2)
    scores = cofi.importance(model, batches(1))
    with pytest.raises(TypeError, match="set_soft_mask"):
        cofi.attach_soft_masks(torch.optim.AdamW(model.parameters()), model, scores)
    with pytest.raises(ValueError, match="mode"):
        cofi.attach_soft_masks(selopt.AdamW(model.parameters()), model, scores, mode="weights")
    with pytest.raises(ValueError, match="output rows"):
        cofi.attach_soft_masks(selopt.AdamW(model.parameters()), tiny(2, ffn=30), scores)


def _kernel_missing() -> str | None:
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        return "the Triton backend needs TRITON_INTERPRET=1 (set by `make test`) or a CUDA device"
    try:
        from selopt import kernels
    except ImportError as err:
        return f"selopt.kernels does not import: {err}"
    if not hasattr(kernels, "multi_tensor_adamw_"):
        return "selopt.kernels has no multi_tensor_adamw_ yet (being written in the kernels issue)"
    return None


@pytest.mark.parametrize("mode", ["update", "grad"])
def test_soft_masks_reach_the_kernels_as_the_reference(mode):
    reason = _kernel_missing()
    if reason:
        pytest.skip(reason)
    results = {}
    for backend in ("torch", "triton"):
        model, _, opt, _ = soft_mask_setup(backend, mode)
        if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            model.cuda()
        train_steps(model, opt)
        results[backend] = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    for name, value in results["torch"].items():
        torch.testing.assert_close(results["triton"][name], value, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------- attention heads


def test_head_masks_cover_each_heads_rows_of_q_k_v():
    model = tiny(2, dim=16, heads=4)
    torch.manual_seed(0)
    scores = cofi.importance(model, batches())
    opt = selopt.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0, backend="torch")
    names = cofi.attach_soft_masks(opt, model, scores)
    for layer in range(2):
        attention = model.model.layers[layer].self_attn
        expected = (1 - scores.heads[layer]).repeat_interleave(4)  # head_dim = 16 / 4
        for proj in ("q_proj", "k_proj", "v_proj"):
            assert f"model.layers.{layer}.self_attn.{proj}.weight" in names
            assert torch.equal(opt._soft_masks[getattr(attention, proj).weight], expected)
        assert attention.o_proj.weight not in opt._soft_masks  # its heads are input columns: unmasked, as upstream
    assert sum(".self_attn." in n for n in names) == 6


def test_head_masks_act_on_training_attention():
    model = tiny(1, dim=16, heads=2)
    torch.manual_seed(0)
    scores = cofi.importance(model, batches())
    scores.heads[0] = torch.tensor([0.9, 0.0])  # head 0 matters, head 1 does not
    cofi.freeze_coarse(model, layers=(0, 1), modules=("q_proj",))
    q = model.model.layers[0].self_attn.q_proj.weight
    masked = selopt.AdamW([q], lr=1e-2, weight_decay=0.0, backend="torch")
    assert cofi.attach_soft_masks(masked, model, scores) == ["model.layers.0.self_attn.q_proj.weight"]
    batch = batches(1, seed=7)[0]
    model(batch[:, :-1]).logsumexp(-1).mean().backward()
    unmasked = reference.adamw_math(q, q.grad, torch.zeros_like(q), torch.zeros_like(q), None, step=1,
                                    options=AdamWOptions(lr=1e-2, weight_decay=0.0)).param
    start = q.detach().clone()
    masked.step()
    ratio = (q.detach() - start).abs().view(2, 8, -1).sum((1, 2)) / (unmasked - start).abs().view(2, 8, -1).sum((1, 2))
    torch.testing.assert_close(ratio, torch.tensor([0.1, 1.0]), rtol=1e-5, atol=1e-6)


def test_grouped_query_heads_take_the_max_of_their_query_heads():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=24, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
    model = transformers.LlamaForCausalLM(config)
    scores = cofi.Importance(ffn={0: torch.zeros(24)}, hidden={0: torch.zeros(16)},
                             heads={0: torch.tensor([0.1, 0.6, 0.3, 0.2])})
    masks = cofi.soft_masks(model, scores)
    prefix = "model.layers.0.self_attn."
    assert torch.equal(masks[prefix + "q_proj.weight"], (1 - scores.heads[0]).repeat_interleave(4))
    # Key/value head 0 serves query heads 0 and 1, head 1 serves 2 and 3 (transformers' repeat_kv).
    for proj in ("k_proj", "v_proj"):
        assert torch.equal(masks[prefix + f"{proj}.weight"], (1 - torch.tensor([0.6, 0.3])).repeat_interleave(4))
        assert torch.equal(masks[prefix + f"{proj}.bias"], masks[prefix + f"{proj}.weight"])


def test_head_masks_never_silently_skip():
    model = tiny(2, dim=16, heads=2)
    scores = cofi.importance(model, batches(1))
    opt = selopt.AdamW(model.parameters())
    with pytest.raises(ValueError, match="head scores for layer 0.*attn_in=\\(\\)"):
        cofi.attach_soft_masks(opt, model, scores, attn_in=("c_attn",))
    assert not opt._soft_masks  # nothing attached before the error
    wrong = cofi.Importance(ffn=scores.ffn, hidden=scores.hidden, heads={i: torch.zeros(3) for i in scores.heads})
    with pytest.raises(ValueError, match="not a multiple of 3 heads"):
        cofi.attach_soft_masks(opt, model, wrong)
    with pytest.raises(TypeError, match="attn_in"):
        cofi.attach_soft_masks(opt, model, scores, attn_in="q_proj")
    # Leaving attention unmasked is a choice one makes explicitly.
    names = cofi.attach_soft_masks(opt, model, scores, attn_in=())
    assert names and not any(".self_attn." in n for n in names)


# ---------------------------------------------------------------- progress of the long-running helpers


def test_search_writes_a_progress_line_per_candidate_unless_silenced(capsys):
    table = {"bottom1": (0.9, 0.2), "top": (0.5, 0.7)}
    candidates = [{"layers": k, "modules": ("up_proj",)} for k in table]

    def train_and_score(config):
        return table[config["layers"]][0], config["layers"]

    ranked = cofi.search(candidates, train_and_score, lambda layers: table[layers][1])
    captured = capsys.readouterr()
    assert captured.out == ""  # stderr, as bench/forgetting.py logs, so that piped results stay clean
    lines = captured.err.splitlines()
    assert lines[0].startswith("[cofi.search] 2 candidate configurations, one fine-tune each (")
    assert lines[1].startswith("[cofi.search] 1/2 layers='bottom1' modules=('up_proj',): speciality 0.9, "
                               "versatility 0.2, score 0.55 (")
    assert lines[2].startswith("[cofi.search] 2/2 layers='top'")
    assert len(lines) == 3 and all(line.endswith("s)") for line in lines)

    silent = cofi.search(candidates, train_and_score, lambda layers: table[layers][1], progress=False)
    assert capsys.readouterr().err == ""
    assert silent == ranked
    with pytest.raises(TypeError, match="progress must be a bool"):
        cofi.search(candidates, train_and_score, lambda layers: 0.0, progress="yes")


def test_importance_writes_progress_unless_silenced(capsys, monkeypatch):
    model = tiny(2)
    torch.manual_seed(0)
    loud = cofi.importance(model, batches(3))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("[cofi.importance] scoring the units of 2 layers")
    assert lines[1].startswith("[cofi.importance] batch 1/3 (")
    assert lines[-1].startswith("[cofi.importance] done: 3 batches (")
    assert len(lines) == 3  # later batches only every PROGRESS_EVERY_S seconds

    monkeypatch.setattr(cofi, "PROGRESS_EVERY_S", 0.0)
    cofi.importance(model, iter(batches(3)))  # no len(): counted without a total
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines[1:]] == [
        "[cofi.importance] batch 1", "[cofi.importance] batch 2", "[cofi.importance] batch 3",
        "[cofi.importance] done: 3 batches"]

    torch.manual_seed(0)
    silent = cofi.importance(model, batches(3), progress=False)
    assert capsys.readouterr().err == ""
    for kind in ("ffn", "hidden", "heads"):
        assert all(torch.equal(getattr(silent, kind)[i], getattr(loud, kind)[i]) for i in getattr(loud, kind))
    with pytest.raises(TypeError, match="progress must be a bool"):
        cofi.importance(model, batches(1), progress=1)
