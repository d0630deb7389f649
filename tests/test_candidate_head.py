"""Two output heads (TinySeek's main and candidate predictions): both train, the dual-head decoding rule, and
what export and the command line do with them (issue 18)."""

import pytest
import torch
from conftest import MIXTRAL
from safetensors import safe_open
from test_inference_command import save_text_model, write_tokenizer_json

from mymoe.config import Config, ConfigError, ModelConfig, MoEConfig, config_from_dict, validate
from mymoe.convert.hf import export_hf
from mymoe.generate import main, parse_args
from mymoe.inference import sample_tokens
from mymoe.model import MoECausalLM
from mymoe.model.transformer import penalize_repetition

VOCAB = 64
PENALTY = 1.3


def tiny_model(seed: int = 0, **fields) -> MoECausalLM:
    config = ModelConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        moe=MoEConfig(n_routed_experts=4, moe_intermediate_size=32),
        **fields,
    )
    validate(Config(model=config))
    torch.manual_seed(seed)
    return MoECausalLM(config)


def confident_model() -> MoECausalLM:
    """Heads scaled up so the main head's top probability ranges widely over positions (a random tiny model's
    probabilities all sit near 1 / vocab, and a threshold between them would decide nothing)."""
    model = tiny_model(candidate_head=True).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
        model.candidate_head.weight.mul_(40)
    return model


def test_both_heads_train_and_the_loss_adds_the_weighted_candidate_loss():
    model = tiny_model(candidate_head=True, candidate_loss_weight=0.5)
    ids = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(3))
    labels = torch.roll(ids, -1, dims=1)
    out = model(ids, shift_labels=labels)
    unweighted = torch.nn.functional.cross_entropy(out.candidate_logits.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(out.candidate_loss, 0.5 * unweighted)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss + out.candidate_loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        out = model(ids, shift_labels=labels)
        losses.append((float(out.lm_loss.detach()), float(out.candidate_loss.detach())))
        optimizer.zero_grad()
        out.loss.backward()
        assert model.candidate_head.weight.grad.abs().sum() > 0
        optimizer.step()
    (main_first, candidate_first), (main_last, candidate_last) = losses[0], losses[-1]
    assert main_last < 0.8 * main_first and candidate_last < 0.8 * candidate_first, losses
    assert model(ids).candidate_loss is None  # no labels, no loss


@torch.no_grad()
def dual_head_reference(model, ids, steps: int, threshold: float):
    """The rule written out, one full forward per step (no cache): (tokens, which head each step chose)."""
    tokens, chose_main = ids, []
    for _ in range(steps):
        out = model(tokens)
        main = penalize_repetition(out.logits[:, -1], tokens, None, PENALTY)
        candidate = penalize_repetition(out.candidate_logits[:, -1], tokens, None, PENALTY)
        use_main = bool(main.softmax(-1).max() >= threshold)
        chose_main.append(use_main)
        next_token = main.argmax(-1) if use_main else candidate.argmax(-1)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
    return tokens, chose_main


def test_dual_head_decoding_follows_the_threshold_rule():
    model = confident_model()
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(1))
    steps = 12

    def dual(threshold):
        return model.generate(
            ids, steps, repetition_penalty=PENALTY, strategy="dual_head", confidence_threshold=threshold
        )

    main_greedy = model.generate(ids, steps, temperature=0, repetition_penalty=PENALTY)
    assert torch.equal(dual(0.0), main_greedy)
    candidate_only, chose_main = dual_head_reference(model, ids, steps, 1.01)
    assert not any(chose_main)
    assert torch.equal(dual(1.01), candidate_only)
    assert not torch.equal(candidate_only, main_greedy)  # the two heads do disagree here

    # a middle threshold: the median of the main head's confidences along the main-greedy path
    confidences = []
    for step in range(steps):
        prefix = main_greedy[:, : ids.shape[1] + step]
        logits = penalize_repetition(model(prefix).logits[:, -1].detach(), prefix, None, PENALTY)
        confidences.append(float(logits.softmax(-1).max()))
    threshold = sorted(confidences)[steps // 2]
    expected, chose_main = dual_head_reference(model, ids, steps, threshold)
    assert any(chose_main) and not all(chose_main), (threshold, confidences)
    assert torch.equal(dual(threshold), expected)
    streamed = list(
        sample_tokens(
            model, ids, steps, 0.7, 50, 0.9, PENALTY, None, None, strategy="dual_head", confidence_threshold=threshold
        )
    )
    assert streamed == expected[0, ids.shape[1] :].tolist()  # mymoe-generate's loop is the same


def test_dual_head_decoding_refuses_what_it_cannot_run():
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="candidate_head=true"):
        tiny_model().generate(ids, 2, strategy="dual_head")
    with pytest.raises(ValueError, match="strategy='beam' is unknown"):
        tiny_model(candidate_head=True).generate(ids, 2, strategy="beam")
    with pytest.raises(ConfigError, match="candidate_loss_weight=-1.0 must be >= 0"):
        validate(config_from_dict({"model": {"candidate_head": True, "candidate_loss_weight": -1.0}}))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--strategy", "dual_head", "--speculative"], "two decoding loops"),
        (["--strategy", "dual_head", "--confidence-threshold", "-1"], "--confidence-threshold=-1.0 must be >= 0"),
    ],
)
def test_command_line_refuses_bad_dual_head_flags(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_export_leaves_the_candidate_head_out_with_a_note(tmp_path, capsys):
    model = tiny_model(candidate_head=True)
    export_hf(model, tmp_path / "hf")
    assert "the candidate head is not exported" in capsys.readouterr().err
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" in keys and not any(key.startswith("candidate_head") for key in keys)


def test_mymoe_generate_decodes_with_both_heads_and_refuses_a_model_without_one(tmp_path, capsys):
    write_tokenizer_json(tmp_path / "tokenizer.json")
    save_text_model(tmp_path / "dual.pt", {**MIXTRAL, "candidate_head": True})
    save_text_model(tmp_path / "plain.pt", MIXTRAL)
    flags = ["--vocab_path", str(tmp_path / "tokenizer.json"), "--prompt", "the cat", "--max_new_tokens", "4"]
    flags += ["--strategy", "dual_head", "--confidence-threshold", "0.3", "--no-stream"]
    assert main(["--model_path", str(tmp_path / "dual.pt"), *flags]) == 0
    out = capsys.readouterr()
    assert "dual-head greedy decoding" in out.err and out.out.startswith("the cat")
    assert main(["--model_path", str(tmp_path / "plain.pt"), *flags]) == 1
    out = capsys.readouterr()
    assert "error: strategy='dual_head' needs a model trained with a candidate head" in out.err and not out.out
