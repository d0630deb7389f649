"""seed-004's Hugging Face-style API: its config names mapped onto ours (one table, mymoe.config.SEED_ALIASES),
identity scoring, and labels that follow Hugging Face (shifted inside the model) against transformers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from hf_family import import_into_ours
from test_convert_hf import random_hf_model

from mymoe import MoEModelConfig, TransformerForCausalLM
from mymoe.config import DEFAULT_BIAS_UPDATE_RATE, ConfigError, MoEConfig, load_config
from mymoe.model.moe.router import Router
from mymoe.model.transformer import MoECausalLM
from mymoe.train.loop import Trainer
from mymoe.parallel import ParallelContext

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)


@pytest.mark.parametrize(
    "alias, target, value, expected",
    [
        ("expert_capacity_factor", "capacity_factor", 1.25, 1.25),
        ("aux_loss_coef", "router_aux_loss_coef", 0.05, 0.05),
        ("router_scaling_factor", "routed_scaling_factor", 2.5, 2.5),
        ("use_null_expert", "overflow_policy", True, "null_expert"),
        ("use_bias_balancing", "bias_update_rate", True, DEFAULT_BIAS_UPDATE_RATE),
        ("topk_method", "scoring_func", "noaux_tc", "sigmoid"),
    ],
)
def test_each_alias_sets_our_field_from_keywords_yaml_and_overrides(tmp_path, alias, target, value, expected):
    assert getattr(MoEModelConfig(**SMALL, **{alias: value}), target) == expected
    assert getattr(MoEModelConfig(**SMALL, **{alias: value}).to_model_config().moe, target) == expected
    written = "true" if value is True else value
    (tmp_path / "seed.yaml").write_text(f"model:\n  moe:\n    {alias}: {written}\n")
    assert getattr(load_config(str(tmp_path / "seed.yaml")).model.moe, target) == expected
    assert getattr(load_config(None, [f"--model.{alias}={written}"]).model.moe, target) == expected


def test_use_moe_false_is_a_dense_model_and_noaux_tc_balances_with_a_bias():
    dense = TransformerForCausalLM(MoEModelConfig(**{**SMALL, "num_hidden_layers": 3}, use_moe=False))
    assert dense.config.first_k_dense_replace == 3 and list(dense.iter_moe_layers()) == []
    deepseek = MoEModelConfig(**SMALL, n_routed_experts=8, n_group=4, topk_group=2, topk_method="noaux_tc")
    assert (deepseek.scoring_func, deepseek.bias_update_rate, deepseek.n_group) == ("sigmoid", 1e-3, 4)
    # an explicit rate stands: the default is only for a rate left at 0
    assert MoEModelConfig(**SMALL, use_bias_balancing=True, bias_update_rate=0.02).bias_update_rate == 0.02


def test_every_moe_field_passes_through_flat_keywords():
    for name in (f.name for f in MoEConfig.__dataclass_fields__.values()):
        assert getattr(MoEModelConfig(**SMALL, **{name: getattr(MoEConfig(), name)}), name) == getattr(
            MoEConfig(), name
        )
    assert MoEModelConfig(**SMALL, n_routed_experts=8, num_experts_per_tok=3).num_experts_per_tok == 3


@pytest.mark.parametrize(
    "values, message",
    [
        ({"aux_loss_coef": 0.1, "router_aux_loss_coef": 0.2}, "router_aux_loss_coef=0.2 is given too: drop one"),
        ({"topk_method": "noaux_tc", "scoring_func": "softmax"}, "scoring_func='softmax' is given too"),
        ({"use_null_expert": False, "overflow_policy": "null_expert"}, "overflow_policy='null_expert' is given too"),
        ({"use_moe": False, "first_k_dense_replace": 1}, "first_k_dense_replace=1 is given too"),
        ({"topk_method": "greedy_best"}, "topk_method='greedy_best' is unknown: use 'noaux_tc'"),
        ({"use_null_expert": "maybe"}, "use_null_expert='maybe' is not a boolean"),
        ({"hidden_sise": 32}, "unknown key 'hidden_sise' in 'MoEModelConfig'. Did you mean hidden_size"),
        ({"num_attention_heads": 3}, "num_attention_heads=3 must divide model.hidden_size=32"),
    ],
)
def test_conflicting_or_bad_seed_names_raise_a_clear_error(values, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MoEModelConfig(**{**SMALL, **values})


def test_agreeing_alias_and_target_are_accepted():
    assert MoEModelConfig(**SMALL, aux_loss_coef=0.1, router_aux_loss_coef=0.1).router_aux_loss_coef == 0.1


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_identity_scoring_ranks_raw_logits(norm_topk_prob):
    moe = MoEConfig(n_routed_experts=6, num_experts_per_tok=2, scoring_func="identity", norm_topk_prob=norm_topk_prob)
    moe.routed_scaling_factor = 1.5
    router = Router(16, moe)
    hidden = torch.randn(10, 16)
    routing = router(hidden)
    logits = hidden @ router.weight.T
    chosen = logits.topk(2, dim=-1)
    assert torch.equal(routing.expert_indices, chosen.indices)
    # raw logits may be negative and sum to 0, so normalised weights are the softmax of the k chosen
    expected = chosen.values.softmax(-1) if norm_topk_prob else chosen.values
    torch.testing.assert_close(routing.expert_weights, 1.5 * expected)
    routing.expert_weights.sum().backward()
    assert router.weight.grad.abs().sum() > 0


def hf_labels_with_ignored(ids: torch.Tensor) -> torch.Tensor:
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt not trained on
    labels[1, -3:] = -100  # padding at the end
    return labels


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_labels_are_input_ids_as_in_transformers(tmp_path, kind):
    reference = random_hf_model(kind)
    ours = import_into_ours(reference, tmp_path)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    for labels in (ids, hf_labels_with_ignored(ids)):
        with torch.no_grad():
            theirs = reference(ids, labels=labels).loss
            mine = ours(ids, labels=labels).lm_loss
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)
    # -100 positions are left out, not scored as token 0 or counted in the mean
    labels = hf_labels_with_ignored(ids)
    with torch.no_grad():
        logits = ours(ids).logits
    kept = labels[:, 1:] != -100
    by_hand = F.cross_entropy(logits[:, :-1][kept], labels[:, 1:][kept])
    torch.testing.assert_close(ours(ids, labels=labels).lm_loss, by_hand, atol=1e-5, rtol=0)


def test_labels_and_shift_labels_agree_and_are_not_both_accepted():
    torch.manual_seed(0)
    model = MoECausalLM(MoEModelConfig(**SMALL).to_model_config())
    ids = torch.randint(0, 64, (2, 9))
    aligned = model(ids, labels=ids).lm_loss
    shifted = model(ids[:, :-1], shift_labels=ids[:, 1:]).lm_loss
    by_hand = F.cross_entropy(model(ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(aligned, by_hand)
    torch.testing.assert_close(shifted, by_hand)
    with pytest.raises(ValueError, match="not both"):
        model(ids, labels=ids, shift_labels=ids)


def test_the_trainer_scores_each_position_on_the_next_token_once(tmp_path):
    """The reader's windows are shifted once, by the reader: a second shift inside the model would score
    position t on token t+2 and give another loss than the one computed here by hand."""
    torch.manual_seed(0)
    trainer = Trainer(tiny_config(tmp_path, max_steps=1, moe={"bias_update_rate": 0.0}), ParallelContext())
    before = copy.deepcopy(trainer.model)
    metrics = trainer.train_step()
    input_ids, targets = trainer.last_batch
    assert torch.equal(input_ids[:, 1:], targets[:, :-1])  # targets are the inputs moved by one
    with torch.no_grad():
        logits = before.train()(input_ids).logits
    by_hand = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert abs(float(metrics["lm_loss"]) - float(by_hand)) < 1e-5
    double_shift = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten())
    assert abs(float(by_hand) - float(double_shift)) > 1e-3  # the check can tell the two apart


def test_the_mtp_head_is_scored_two_tokens_ahead_of_hugging_face_labels():
    torch.manual_seed(0)
    model = MoECausalLM(MoEModelConfig(**SMALL, num_nextn_predict_layers=1).to_model_config())
    ids = torch.randint(0, 64, (2, 9))
    out = model(ids, labels=ids)
    two_ahead = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)  # shift_labels[t + 1] = ids[t + 2]
    torch.testing.assert_close(out.mtp_loss, model(ids, shift_labels=two_ahead).mtp_loss)
    assert abs(out.mtp_loss.item() - model(ids, shift_labels=ids).mtp_loss.item()) > 1e-3
