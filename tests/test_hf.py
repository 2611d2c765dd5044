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
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, attention_bias=True, tie_word_embeddings=False,
        **config,
    )
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
