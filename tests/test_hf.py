"""selopt with Hugging Face: Trainer's param-group rule, Trainer training, optimizer.pt save and exact resume."""

from __future__ import annotations

import os

import pytest
import torch

import selopt
import selopt.hf

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here downloads; fail rather than reach the network
transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install 'selopt[hf]')")

STEPS, SAVE_AT = 6, 3


def _tiny_llama(seed: int = 0, **config):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{
        "vocab_size": 64, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "max_position_embeddings": 32, "attention_bias": True, "tie_word_embeddings": False,
        **config,
    })
    return transformers.LlamaForCausalLM(config)


class _LayerNormNet(torch.nn.Module):
    """Norms under names Trainer's patterns miss (``ln_f``) and an RMSNorm by class only."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 6)
        self.ln_f = torch.nn.LayerNorm(6)
        self.gate = torch.nn.RMSNorm(6)
        self.head = torch.nn.Linear(6, 2, bias=False)
        self.scale = torch.nn.Parameter(torch.ones(2))


def test_no_decay_names_follow_trainer_rule_on_llama():
    model = _tiny_llama()
    trainer_decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
    ours = selopt.hf.no_decay_parameter_names(model)
    names = {name for name, _ in model.named_parameters()}
    assert ours == names - trainer_decay
    assert any("layernorm" in n for n in ours) and any(n.endswith("bias") for n in ours) and "model.norm.weight" in ours


def test_no_decay_names_recognise_norm_classes():
    model = _LayerNormNet()
    assert selopt.hf.no_decay_parameter_names(model) == {"proj.bias", "ln_f.weight", "ln_f.bias", "gate.weight"}
    # Trainer's own rule agrees on nn.LayerNorm and misses the RMSNorm named "gate".
    trainer_no_decay = {n for n, _ in model.named_parameters()} - set(
        transformers.Trainer.get_decay_parameter_names(None, model)
    )
    assert trainer_no_decay == {"proj.bias", "ln_f.weight", "ln_f.bias"}


@pytest.mark.parametrize("frozen", [False, True])
def test_trainer_param_groups(frozen):
    model = _tiny_llama()
    if frozen:
        model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    groups = selopt.hf.trainer_param_groups(model, weight_decay=0.1, fraction=0.2, block_size=256)
    selective, dense = groups
    assert (selective["weight_decay"], selective["fraction"], selective["block_size"]) == (0.1, 0.2, 256)
    assert (dense["weight_decay"], dense["fraction"]) == (0.0, 1.0)
    grouped = [p for g in groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len(trainable) and all(a is b for a, b in zip(sorted(grouped, key=id), sorted(trainable, key=id)))
    assert all(p.dim() == 2 for p in selective["params"]) and all(p.dim() == 1 for p in dense["params"])
    assert selopt.hf.trainer_param_groups(torch.nn.LayerNorm(3), weight_decay=0.1)[0]["fraction"] == 1.0


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 24, length: int = 8):
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (n, length), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(output_dir, fraction):
    model = _tiny_llama()
    opt = selopt.MoFO(
        selopt.hf.trainer_param_groups(model, weight_decay=0.01, fraction=fraction, decay="selected"),
        lr=1e-2, betas=(0.9, 0.99),
    )
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=STEPS, save_steps=SAVE_AT, per_device_train_batch_size=4,
        learning_rate=123.0,  # unused: the optimizer's own lr is scheduled; a wrong path would diverge
        lr_scheduler_type="linear", warmup_steps=2, seed=7, use_cpu=True, report_to="none", disable_tqdm=True,
        dataloader_pin_memory=False, logging_strategy="no", save_strategy="steps",
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(), optimizers=(opt, None))
    return trainer, model, opt


def test_trainer_trains_saves_and_resumes_exactly(tmp_path):
    fraction = 0.05
    uninterrupted, model, opt = _trainer(tmp_path / "a", fraction)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    uninterrupted.train()
    checkpoint = tmp_path / "a" / f"checkpoint-{SAVE_AT}"
    assert (checkpoint / "optimizer.pt").exists()
    assert all(float(opt.state[p]["step"]) == STEPS for g in opt.param_groups for p in g["params"])

    # MoFO acted through Trainer: each step moves at most ~fraction of a matrix (ties aside).
    weight = dict(model.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    moved = (weight.detach() != init["model.layers.0.mlp.up_proj.weight"]).float().mean().item()
    assert 0 < moved <= STEPS * fraction + 0.01

    resumed, model_resumed, _ = _trainer(tmp_path / "b", fraction)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for (name, p), q in zip(model.named_parameters(), model_resumed.parameters()):
        assert torch.equal(p, q), f"{name}: resumed run differs by {(p - q).abs().max()}"


# ---------------------------------------------------------------- optimizer_cls_and_kwargs


def _args(output_dir, **overrides):
    options = dict(
        output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=123.0,
        seed=7, use_cpu=True, report_to="none", disable_tqdm=True, dataloader_pin_memory=False,
        logging_strategy="no", save_strategy="no",
    )
    return transformers.TrainingArguments(**{**options, **overrides})


def test_trainer_builds_selopt_with_vectors_dense(tmp_path):
    model = _tiny_llama()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = transformers.Trainer(
        model=model, args=_args(tmp_path, weight_decay=0.1), train_dataset=_Tokens(),
        optimizer_cls_and_kwargs=(selopt.hf.TrainerMoFO, {"lr": 1e-2, "fraction": 0.05, "weight_decay": 0.9, "decay": "selected"}),
    )
    trainer.train()
    opt = trainer.optimizer.optimizer  # accelerate's wrapper around it
    assert type(opt) is selopt.hf.TrainerMoFO
    ours = [(len(g["params"]), g["weight_decay"], g["fraction"], g["initial_lr"]) for g in opt.param_groups]
    # Trainer's weight decay (not the kwargs') on its decay group; its no-decay group trains densely;
    # the schedule starts from the kwargs' lr, not from args.learning_rate.
    assert ours == [(len(selopt.hf.trainer_param_groups(model)[0]["params"]), 0.1, 0.05, 1e-2),
                    (len(selopt.hf.no_decay_parameter_names(model)), 0.0, 1.0, 1e-2)]
    params = dict(model.named_parameters())
    norm_moved = (params["model.layers.0.input_layernorm.weight"] != init["model.layers.0.input_layernorm.weight"])
    assert norm_moved.all()
    up = "model.layers.0.mlp.up_proj.weight"
    assert 0 < (params[up] != init[up]).float().mean().item() <= STEPS * 0.05 + 0.01


def test_trainer_optimizer_classes_need_lr():
    model = torch.nn.Linear(3, 3)
    for cls in (selopt.hf.TrainerAdamW, selopt.hf.TrainerMoFO):
        with pytest.raises(TypeError, match="needs lr.*TrainingArguments.learning_rate"):
            cls([{"params": list(model.parameters()), "weight_decay": 0.0}])
    opt = selopt.hf.TrainerAdamW(model.parameters(), lr=1e-3)
    assert [g["fraction"] for g in opt.param_groups] == [1.0, 1.0]


def test_dense_vectors_keeps_names_and_options():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    named = selopt.groups.dense_vectors([{"params": list(model.named_parameters()), "lr": 0.5}])
    assert [[n for n, _ in g["params"]] for g in named] == [["0.weight"], ["0.bias", "1.weight", "1.bias"]]
    assert [(g["lr"], g.get("fraction")) for g in named] == [(0.5, None), (0.5, 1.0)]
    explicit = selopt.groups.dense_vectors(
        [{"params": [model[0].weight, model[0].bias], "param_names": ["w", "b"]}])
    assert [g["param_names"] for g in explicit] == [["w"], ["b"]]


def test_selopt_cannot_be_chosen_by_name():
    # What the README says: TrainingArguments accepts only transformers' own optimizer names.
    with pytest.raises(ValueError, match="OptimizerNames"):
        transformers.TrainingArguments("unused", optim="mofo", use_cpu=True, report_to="none")


# ---------------------------------------------------------------- update statistics in Trainer's logs


class _Recorder(transformers.TrainerCallback):
    """Stands in for a reporting integration: keeps what on_log hands it."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


@pytest.mark.parametrize("per_tensor", [False, True])
def test_update_stats_reach_trainer_logs(tmp_path, per_tensor):
    model = _tiny_llama()
    opt = selopt.MoFO(selopt.hf.trainer_param_groups(model, weight_decay=0.01, fraction=0.1), lr=1e-2)
    recorder = _Recorder()
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, logging_strategy="steps", logging_steps=2), train_dataset=_Tokens(),
                                   optimizers=(opt, None), callbacks=[recorder])
    selopt.hf.log_update_stats(trainer, per_tensor=per_tensor)
    trainer.train()
    training_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in training_logs] == [2, 4, 6]
    for entry, seen in zip(training_logs, recorder.logs):
        assert 0.09 < entry["selopt/group0/moved"] < 0.15  # floor(0.1 * n) per matrix, ties aside
        assert entry["selopt/group1/moved"] == 1.0
        assert entry["selopt/group0/decayed"] == 1.0  # decay="all": weight decay changes every entry
        assert "selopt/group1/decayed" not in entry  # no weight decay on biases and norms
        total = sum(p.numel() for p in opt.param_groups[0]["params"])
        assert entry["selopt/group0/moved_entries"] == round(entry["selopt/group0/moved"] * total)
        # Ahead of the "reporting integration": it saw the statistics too.
        assert {k: v for k, v in seen.items() if k.startswith("selopt/")} == {
            k: v for k, v in entry.items() if k.startswith("selopt/")}
    per_tensor_keys = [k for k in training_logs[0] if k.endswith("/moved") and "/group" not in k]
    if per_tensor:
        assert "selopt/model.layers.0.self_attn.q_proj.weight/moved" in per_tensor_keys
        assert len(per_tensor_keys) == len(list(model.parameters()))
    else:
        assert not per_tensor_keys


def test_update_stats_callback_in_callbacks_list(tmp_path):
    model = _tiny_llama()
    opt = selopt.AdamW(selopt.hf.trainer_param_groups(model, weight_decay=0.0, fraction=1.0), lr=1e-3)
    recorder = _Recorder()
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, logging_strategy="steps", logging_steps=3), train_dataset=_Tokens(),
                                   optimizers=(opt, None), callbacks=[recorder, selopt.hf.UpdateStatsCallback()])
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["selopt/group0/moved"] for entry in logged] == [1.0, 1.0]
    assert not any(k.startswith("selopt/") for entry in recorder.logs for k in entry)  # it came first


def test_update_stats_callback_needs_selopt(tmp_path):
    model = _tiny_llama()
    trainer = transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=_Tokens(),
                                   callbacks=[selopt.hf.UpdateStatsCallback()])
    # Trainer hands the callback accelerate's wrapper: the error names the optimizer inside it.
    with pytest.raises(TypeError, match=r"needs a selopt optimizer .* Trainer has torch\.optim\.adamw\.AdamW$"):
        trainer.train()
    with pytest.raises(TypeError, match="per_tensor"):
        selopt.hf.UpdateStatsCallback(per_tensor=1)
    with pytest.raises(TypeError, match="transformers.Trainer"):
        selopt.hf.log_update_stats(object())


@pytest.mark.parametrize("moment_dtype", [None, "8bit"])
def test_trainer_built_optimizer_resumes_exactly(tmp_path, moment_dtype):
    def run(output_dir, resume=None):
        # 8-bit moments need matrices of 4096+ entries: hidden 64, intermediate 128.
        model = _tiny_llama() if moment_dtype is None else _tiny_llama(hidden_size=64, intermediate_size=128)
        trainer = transformers.Trainer(
            model=model, train_dataset=_Tokens(),
            args=_args(output_dir, weight_decay=0.01, save_strategy="steps", save_steps=SAVE_AT,
                       lr_scheduler_type="linear", warmup_steps=2),
            optimizer_cls_and_kwargs=(selopt.hf.TrainerMoFO, {"lr": 1e-2, "fraction": 0.05, "betas": (0.9, 0.99),
                                                              "moment_dtype": moment_dtype}),
        )
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer.optimizer.optimizer

    uninterrupted, opt = run(tmp_path / "a")
    resumed, _ = run(tmp_path / "b", resume=str(tmp_path / "a" / f"checkpoint-{SAVE_AT}"))
    stored = {opt.state[p]["exp_avg"].dtype for p in uninterrupted.parameters()}
    assert stored == ({torch.uint8, torch.float32} if moment_dtype else {torch.float32})
    for (name, p), q in zip(uninterrupted.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), f"{name}: resumed run differs by {(p - q).abs().max()}"
