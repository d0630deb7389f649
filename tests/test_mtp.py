"""Multi-token prediction: its loss trains the extra head, and self-speculative decoding is exactly greedy."""

import pytest
import torch

from mymoe.config import ModelConfig, MoEConfig
from mymoe.model import MoECausalLM
from mymoe.model.mtp import speculative_greedy


def mtp_config(**overrides):
    values = dict(
        vocab_size=16,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        num_nextn_predict_layers=1,
        mtp_loss_weight=0.5,
        moe=MoEConfig(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    )
    values.update(overrides)
    return ModelConfig(**values)


def test_mtp_loss_is_scored_on_the_token_after_next():
    torch.manual_seed(0)
    model = MoECausalLM(mtp_config())
    ids = torch.randint(0, 16, (2, 9))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    out = model(ids, shift_labels=labels)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss + 0.5 * out.mtp_loss)
    assert len(out.router_stats) == 3  # two blocks and the MTP block
    out.loss.backward()
    assert model.mtp.eh_proj.weight.grad.abs().sum() > 0
    assert [layer.experts.num_experts for layer in model.iter_moe_layers()] == [4, 4, 4]
    assert model(ids).mtp_loss is None  # no labels, no extra work


def train_on_a_cycle(model, steps=150):
    """A pattern both heads can learn: each sequence counts up modulo the vocabulary from a random start."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        start = torch.randint(0, 16, (8, 1), generator=generator)
        ids = (start + torch.arange(17)) % 16
        loss = model(ids[:, :-1], shift_labels=ids[:, 1:]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(loss)


@pytest.mark.parametrize("trained", [False, True])
def test_self_speculative_decoding_equals_greedy(trained):
    torch.manual_seed(0)
    model = MoECausalLM(mtp_config())
    if trained:
        assert train_on_a_cycle(model) < 0.5
    model.eval()
    prompt = torch.tensor([[3, 4, 5, 6]])
    greedy = model.generate(prompt, 20, temperature=0)
    result = speculative_greedy(model, prompt, 20)
    assert torch.equal(result.tokens, greedy)
    print(f"trained={trained}: acceptance rate {result.acceptance_rate:.2f} over {result.drafts} drafts")
    if trained:
        assert result.acceptance_rate > 0.8  # the head learned the pattern: most steps yield two tokens
        assert result.drafts < 14


def test_speculative_decoding_needs_the_head_and_one_prompt():
    model = MoECausalLM(mtp_config(num_nextn_predict_layers=0))
    with pytest.raises(ValueError, match="num_nextn_predict_layers=1"):
        speculative_greedy(model, torch.zeros(1, 3, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="one prompt at a time"):
        speculative_greedy(MoECausalLM(mtp_config()), torch.zeros(2, 3, dtype=torch.long), 4)


def test_generate_command_decodes_speculatively_from_a_checkpoint(tmp_path, capsys):
    import sentencepiece as spm

    from mymoe.generate import main as generate_main
    from conftest import tiny_config, train_in_process

    text = tmp_path / "corpus.txt"
    text.write_text(
        "\n".join(f"the {animal} saw {count} birds" for animal in ("cat", "dog", "owl") for count in range(20))
    )
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(tmp_path / "tok"),
        vocab_size=40,
        model_type="bpe",
        eos_id=1,
        bos_id=-1,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    config = tiny_config(tmp_path / "work", max_steps=2, model={"num_nextn_predict_layers": 1})
    train_in_process(tmp_path / "work", stop_at=2, save_at=(2,), config=config)
    checkpoint, tokenizer = tmp_path / "work" / "run" / "checkpoints", tmp_path / "tok.model"
    common = [
        "--checkpoint",
        str(checkpoint),
        "--vocab_path",
        str(tokenizer),
        "--prompt",
        "the cat",
        "--max_new_tokens",
        "10",
    ]
    assert generate_main(common + ["--speculative"]) == 0
    speculative = capsys.readouterr()
    assert "draft acceptance rate" in speculative.err
    assert generate_main(common + ["--temperature", "0", "--repetition_penalty", "1", "--no_stream"]) == 0
    greedy = capsys.readouterr()
    assert speculative.out.strip() == greedy.out.strip()
