"""MoFO on LoRA parameters (peft): only the adapters train, MoFO selects among their entries."""

from __future__ import annotations

import os

import pytest
import torch

import selopt

os.environ["HF_HUB_OFFLINE"] = "1"
peft = pytest.importorskip("peft", reason="peft is not installed (pip install 'selopt[demo]')")
transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install 'selopt[hf]')")


def _lora_model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    base = transformers.LlamaForCausalLM(config)
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
    return peft.get_peft_model(base, lora)


def test_mofo_on_lora_parameters():
    model = _lora_model()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert lora_before and all("lora_" in n for n in lora_before)

    # param_groups takes the trainable (LoRA) matrices only; MoFO moves 25% of each per step.
    opt = selopt.MoFO(selopt.param_groups(model, weight_decay=0.0, fraction=0.25), lr=1e-2, backend="torch")
    opt.track_updates()
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    stats = opt.update_stats().groups[0]
    assert stats.entries == sum(p.numel() for p in lora_before.values())
    # lora_A has zero gradients while lora_B is zero: its m is 0, so it does not move; each lora_B moves its 25%.
    lora_b = {n: p for n, p in lora_before.items() if "lora_B" in n}
    assert stats.moved == sum(selopt.reference.block_k(0.25, p.numel()) for p in lora_b.values())
    opt.zero_grad()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()

    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], before) for n, before in base_before.items())  # the base model is frozen
    lora_b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"
    moved = (params[lora_b] != lora_before[lora_b]).float().mean().item()
    assert 0 < moved < 0.6  # MoFO left entries of the adapter untouched ...
    merged = model.merge_and_unload()
    delta = merged.model.layers[0].self_attn.q_proj.weight - base_before[
        "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
    # ... but a moved entry of B changes a whole row of the merged weight B @ A.
    assert (delta != 0).float().mean().item() > 1.5 * moved
