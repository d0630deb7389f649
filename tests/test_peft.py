"""LoRA and prefix tuning: only adapters train, merging keeps the logits, adapters save and load alone."""

import pytest
import torch

from mymoe.config import ModelConfig, MoEConfig
from mymoe.model import MoECausalLM
from mymoe.peft import apply_peft, load_lora_state_dict, lora_state_dict, merge_lora


def config():
    return ModelConfig(
        vocab_size=53,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        moe=MoEConfig(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1),
    )


ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate", "experts", "shared_experts"]


def train_steps(model, steps=3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 53, (2, 12), generator=generator)
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()


def test_lora_trains_only_adapters_and_merges_to_the_same_logits():
    torch.manual_seed(0)
    model = MoECausalLM(config())
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = torch.randint(0, 53, (2, 10))
    before = model(ids).logits
    apply_peft(model, lora_rank=4, lora_alpha=8, lora_targets=ALL)
    torch.testing.assert_close(model(ids).logits, before)  # B starts at zero: the base model exactly
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    assert any("experts.parametrizations.w_down" in n for n in trainable)
    assert any("mlp.gate.parametrizations.weight" in n for n in trainable)
    train_steps(model)
    for name, p in model.named_parameters():
        if name.endswith(".original"):  # the frozen base weights did not move
            plain = name.replace(".parametrizations.", ".").replace(".original", "")
            assert torch.equal(p, base[plain]), name
    adapted = model(ids).logits
    assert not torch.allclose(adapted, before)
    merge_lora(model)
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert model.model.layers[0].mlp.experts.w_gate.is_expert  # the expert marker survives merging
    torch.testing.assert_close(model(ids).logits, adapted, atol=1e-5, rtol=1e-5)
    fresh = MoECausalLM(config())
    fresh.load_state_dict(model.state_dict())  # merged: plain names, loadable by an unadapted model


def test_adapters_save_and_load_on_their_own(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = apply_peft(MoECausalLM(config()), lora_rank=2, lora_targets=["q_proj", "experts"], prefix_length=3)
    train_steps(model, 2)
    path = tmp_path / "adapters.safetensors"
    save_file(lora_state_dict(model), str(path))
    torch.manual_seed(0)
    other = apply_peft(MoECausalLM(config()), lora_rank=2, lora_targets=["q_proj", "experts"], prefix_length=3)
    load_lora_state_dict(other, load_file(str(path)))
    ids = torch.randint(0, 53, (1, 7))
    torch.testing.assert_close(other(ids).logits, model(ids).logits)
    wrong = apply_peft(MoECausalLM(config()), lora_rank=3, lora_targets=["q_proj", "experts"], prefix_length=3)
    with pytest.raises(ValueError, match="use the same LoRA rank"):
        load_lora_state_dict(wrong, load_file(str(path)))


def test_prefix_tuning_trains_prefixes_and_decodes_with_a_cache():
    torch.manual_seed(0)
    model = apply_peft(MoECausalLM(config()), prefix_length=4)
    assert sorted({n.split(".prefix.")[1] for n, p in model.named_parameters() if p.requires_grad}) == [
        "keys",
        "values",
    ]
    train_steps(model, 2)
    model.eval()
    ids = torch.randint(0, 53, (2, 9))
    full = model(ids).logits
    prefill = model(ids[:, :5], use_cache=True)
    pieces = [prefill.logits] + [
        model(ids[:, t : t + 1], past_key_values=prefill.past_key_values).logits for t in range(5, 9)
    ]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


def test_bad_targets_are_named():
    with pytest.raises(ValueError, match="unknown LoRA target"):
        apply_peft(MoECausalLM(config()), lora_rank=2, lora_targets=["qkv"])


def test_trainer_fine_tunes_only_adapters_from_config(tmp_path):
    from mymoe.config import load_config
    from mymoe.parallel import ParallelContext
    from mymoe.train.loop import Trainer
    from conftest import TINY_CONFIG, make_dataset, tiny_overrides

    train, valid = make_dataset(tmp_path / "data")
    overrides = tiny_overrides(
        train,
        valid,
        tmp_path / "run",
        3,
        {"peft.lora_rank": 4, "peft.prefix_length": 2, "peft.lora_targets": "[q_proj, experts]"},
    )
    trainer = Trainer(load_config(str(TINY_CONFIG), overrides), ParallelContext())
    frozen = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if not p.requires_grad}
    assert frozen and any(p.requires_grad for p in trainer.model.parameters())
    losses = [trainer.train_step()["loss"] for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    for name, p in trainer.model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name


def test_a_lora_checkpoint_loads_merged_for_generation_and_export(tmp_path):
    from mymoe.checkpoint import CheckpointManager
    from mymoe.load import load_model
    from mymoe.config import load_config
    from mymoe.convert.hf import export_refusals
    from mymoe.parallel import ParallelContext
    from mymoe.train.loop import Trainer
    from conftest import TINY_CONFIG, make_dataset, tiny_overrides

    train, valid = make_dataset(tmp_path / "data")
    overrides = tiny_overrides(
        train, valid, tmp_path / "run", 2, {"peft.lora_rank": 4, "peft.lora_targets": "[q_proj, experts, gate]"}
    )
    config = load_config(str(TINY_CONFIG), overrides)
    trainer = Trainer(config, ParallelContext())
    for _ in range(2):
        trainer.train_step()
    manager = CheckpointManager(tmp_path / "run" / "checkpoints", config, ParallelContext(), verbose=False)
    manager.save(trainer)
    model, _, _ = load_model(tmp_path / "run" / "checkpoints")
    assert not any("lora" in name for name, _ in model.named_parameters())
    ids = torch.randint(0, 48, (2, 16))
    torch.testing.assert_close(model.eval()(ids).logits, trainer.model.eval()(ids).logits, atol=1e-5, rtol=1e-5)

    prefixed = apply_peft(MoECausalLM(config.model), prefix_length=2)
    assert any("prefix-tuning adapters" in problem for problem in export_refusals(prefixed, "qwen2_moe"))
