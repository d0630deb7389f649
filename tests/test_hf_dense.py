"""Dense Llama and Qwen3 checkpoints as all-dense models of ours (import, export, greedy tokens, training
against transformers), and `mymoe-convert upcycle` from a Llama folder: the MoE's logits equal the dense
model's, and a few training steps lower its loss."""

from __future__ import annotations

import pytest
import torch

from hf_family import BATCH, check_family, draw_away_from_defaults, logits_of, next_token_loss


def llama(attention_bias: bool = False, tie: bool = False):
    import transformers

    torch.manual_seed(1)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        attention_bias=attention_bias,
        tie_word_embeddings=tie,
    )
    model = transformers.LlamaForCausalLM(config)
    draw_away_from_defaults(model)
    return model.eval()


def qwen3():
    import transformers

    torch.manual_seed(1)
    config = transformers.Qwen3Config(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        intermediate_size=48,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
    model = transformers.Qwen3ForCausalLM(config)
    draw_away_from_defaults(model)
    return model.eval()


def test_llama_with_attention_biases_imports_exports_and_trains_like_transformers(tmp_path):
    check_family(llama(attention_bias=True), tmp_path, "llama", "LlamaForCausalLM")


def test_qwen3_imports_exports_and_trains_like_transformers(tmp_path):
    check_family(qwen3(), tmp_path, "qwen3", "Qwen3ForCausalLM")


def test_a_dense_import_is_all_dense_and_exports_as_itself(tmp_path):
    from mymoe.convert.consolidate import load_consolidated_model
    from mymoe.convert.hf import choose_format, import_hf

    llama().save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ours.safetensors")
    model, config = load_consolidated_model(tmp_path / "ours.safetensors")
    assert config.model.first_k_dense_replace == 2 and list(model.iter_moe_layers()) == []
    assert choose_format(model) == "llama"


def test_mlp_biases_are_refused_on_import_and_nothing_written(tmp_path):
    import transformers

    from mymoe.checkpoint import CheckpointError
    from mymoe.convert.hf import import_hf

    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, mlp_bias=True
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="mlp_bias=true: mymoe's MLPs have no biases"):
        import_hf(tmp_path / "hf", tmp_path / "ours.safetensors")
    assert not (tmp_path / "ours.safetensors").exists()


def test_an_moe_is_refused_as_llama(tmp_path):
    from mymoe.checkpoint import CheckpointError
    from mymoe.config import config_from_dict, validate
    from mymoe.convert.hf import export_hf
    from mymoe.model import MoECausalLM

    model = MoECausalLM(
        validate(config_from_dict({"model": {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1}})).model
    )
    with pytest.raises(CheckpointError, match="Llama is a dense model, without MoE layers"):
        export_hf(model, tmp_path / "hf", "llama")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_upcycling_a_llama_folder_keeps_its_logits_and_then_trains(tmp_path, capsys, tie):
    from mymoe.convert.cli import main
    from mymoe.convert.consolidate import load_consolidated_model

    reference = llama(attention_bias=True, tie=tie)
    reference.save_pretrained(tmp_path / "llama")
    assert (
        main(["upcycle", str(tmp_path / "llama"), str(tmp_path / "moe.safetensors"), "--experts", "4", "--top-k", "2"])
        == 0
    )
    assert "fine-tune with --train.init_from" in capsys.readouterr().out
    model, config = load_consolidated_model(tmp_path / "moe.safetensors")
    assert (tmp_path / "moe.yaml").exists()
    assert len(list(model.iter_moe_layers())) == 2 and config.model.moe.n_routed_experts == 4
    model.eval()
    difference = float((logits_of(model) - logits_of(reference)).abs().max())
    assert difference < 1e-5, difference
    # a few steps of the upcycled MoE on one batch lower its loss
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        output = model(BATCH)
        loss = next_token_loss(output.logits, BATCH) + output.aux_loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_upcycling_an_moe_is_refused(tmp_path):
    from mymoe.convert.cli import main

    from test_hf_olmoe import olmoe

    olmoe(None, False).save_pretrained(tmp_path / "olmoe")
    assert (
        main(["upcycle", str(tmp_path / "olmoe"), str(tmp_path / "moe.safetensors"), "--experts", "4", "--top-k", "2"])
        == 1
    )
    assert not (tmp_path / "moe.safetensors").exists()
