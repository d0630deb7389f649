"""The MoE-layer tutorial's model options: GELU FFNs and experts, LayerNorm, dropout, bidirectional attention,
and what export does with each (issue 17)."""

import json

import pytest
import torch
from conftest import tiny_config as conftest_tiny_config
from conftest import train_in_process
import torch.nn.functional as F
from torch import nn

from mymoe.checkpoint import CheckpointError
from mymoe.config import Config, ConfigError, ModelConfig, MoEConfig, config_from_dict, validate
from mymoe.convert.hf import export_hf
from mymoe.convert.megatron_names import megatron_state_dict
from mymoe.equivalence import without_randomness
from mymoe.load import load_model
from mymoe.model import MoECausalLM
from mymoe.model.layers import GELUMLP
from mymoe.model.moe.dispatch import ExpertBatch
from mymoe.model.moe.experts import GroupedExperts
from mymoe.peft import add_lora

HIDDEN, FFN, EXPERTS, VOCAB = 16, 32, 4, 64


def tiny_config(**fields) -> ModelConfig:
    moe = MoEConfig(n_routed_experts=EXPERTS, moe_intermediate_size=FFN, **fields.pop("moe", {}))
    defaults = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2, num_attention_heads=2
    )
    return ModelConfig(**{**defaults, **fields}, moe=moe)


def tiny_model(seed: int = 0, **fields) -> MoECausalLM:
    config = tiny_config(**fields)
    validate(Config(model=config))
    torch.manual_seed(seed)
    return MoECausalLM(config)


def expert_batch(tokens: int = 20, seed: int = 1) -> ExpertBatch:
    """Tokens gathered k=2 times into expert-sorted rows, with a routing weight per row."""
    generator = torch.Generator().manual_seed(seed)
    source = torch.randn(tokens, HIDDEN, generator=generator, requires_grad=True)
    expert_of_row = torch.randint(0, EXPERTS, (2 * tokens,), generator=generator).sort().values
    row_index = torch.randperm(2 * tokens, generator=generator) % tokens
    weight = torch.rand(2 * tokens, generator=generator, requires_grad=True)
    counts = torch.bincount(expert_of_row, minlength=EXPERTS)
    return ExpertBatch(source, counts, row_index, weight, tokens)


def reference_gelu_experts(batch: ExpertBatch, w_up, w_down, keep=None, p: float = 0.0) -> torch.Tensor:
    """Per expert in plain autograd: out[index] += weight * dropout(gelu(x @ w_up)) @ w_down."""
    rows = batch.source.index_select(0, batch.row_index)
    inner = torch.cat([F.gelu(r @ w_up[e]) for e, r in enumerate(rows.split(batch.tokens_per_expert.tolist()))])
    if keep is not None:
        inner = inner * keep / (1 - p)
    outputs = (
        torch.cat([i @ w_down[e] for e, i in enumerate(inner.split(batch.tokens_per_expert.tolist()))])
        * batch.row_weight[:, None]
    )
    return outputs.new_zeros(batch.out_rows, HIDDEN).index_add(0, batch.row_index, outputs)


def gradients(output, tensors, upstream):
    return torch.autograd.grad((output * upstream).sum(), tensors)


@pytest.mark.parametrize("grouped_mm,chunk_bytes", [(True, 16 << 20), (False, 16 << 20), (True, 1)])
def test_gelu_experts_fused_path_matches_plain_reference(grouped_mm, chunk_bytes):
    torch.manual_seed(0)
    experts = GroupedExperts(EXPERTS, HIDDEN, FFN, init_std=0.3, activation="gelu")
    assert [name for name, _ in experts.named_parameters()] == ["w_up", "w_down"]  # no gate matrix
    assert experts.num_parameters_per_expert() == 2 * HIDDEN * FFN
    experts.use_grouped_mm, experts.chunk_bytes = grouped_mm, chunk_bytes
    batch = expert_batch()
    out = experts(batch)
    upstream = torch.randn_like(out)
    inputs = (batch.source, batch.row_weight, experts.w_up, experts.w_down)
    got = gradients(out, inputs, upstream)
    expected_out = reference_gelu_experts(batch, experts.w_up, experts.w_down)
    expected = gradients(expected_out, inputs, upstream)
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-5)
    for name, mine, theirs in zip(("source", "row weight", "w_up", "w_down"), got, expected):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5, msg=f"gradient of {name}")


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_expert_dropout_in_the_fused_path_trains_through_its_mask_and_is_off_in_eval(activation):
    torch.manual_seed(0)
    p = 0.4
    experts = GroupedExperts(EXPERTS, HIDDEN, FFN, init_std=0.3, activation=activation, dropout=p)
    batch = expert_batch()
    experts.eval()
    eval_out = experts(batch)
    plain = GroupedExperts(EXPERTS, HIDDEN, FFN, init_std=0.3, activation=activation)
    plain.load_state_dict(experts.state_dict())
    torch.testing.assert_close(eval_out, plain(batch), atol=0, rtol=0)  # eval: no dropout at all

    experts.train()
    torch.manual_seed(5)
    out = experts(batch)
    assert not torch.allclose(out, eval_out)
    upstream = torch.randn_like(out)
    weights = [experts.w_up, experts.w_down] + ([experts.w_gate] if activation == "swiglu" else [])
    inputs = (batch.source, batch.row_weight, *weights)
    got = gradients(out, inputs, upstream)
    # one chunk draws one [rows, ffn] uniform tensor: the same seed replays the mask for the reference
    torch.manual_seed(5)
    keep = torch.rand(int(batch.tokens_per_expert.sum()), FFN) >= p
    if activation == "gelu":
        expected_out = reference_gelu_experts(batch, experts.w_up, experts.w_down, keep, p)
    else:
        rows = batch.source.index_select(0, batch.row_index).split(batch.tokens_per_expert.tolist())
        inner = torch.cat([F.silu(r @ experts.w_gate[e]) * (r @ experts.w_up[e]) for e, r in enumerate(rows)])
        inner = (inner * keep / (1 - p)).split(batch.tokens_per_expert.tolist())
        rows_out = torch.cat([i @ experts.w_down[e] for e, i in enumerate(inner)]) * batch.row_weight[:, None]
        expected_out = rows_out.new_zeros(batch.out_rows, HIDDEN).index_add(0, batch.row_index, rows_out)
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-5)
    for mine, theirs in zip(got, gradients(expected_out, inputs, upstream)):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


def test_gelu_everywhere_builds_plain_ffns_and_trains():
    model = tiny_model(
        hidden_act="gelu", first_k_dense_replace=1, moe={"expert_activation": "gelu", "n_shared_experts": 1}
    )
    dense, moe = model.model.layers[0].mlp, model.model.layers[1].mlp
    assert isinstance(dense, GELUMLP) and isinstance(moe.shared_experts, GELUMLP)
    assert not hasattr(moe.experts, "w_gate")
    assert "model.layers.1.mlp.experts.w_gate" not in model.state_dict()
    ids = torch.randint(0, VOCAB, (2, 8))
    model(ids, labels=ids).loss.backward()
    for name in (
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.mlp.experts.w_up",
        "model.layers.1.mlp.shared_experts.down_proj.weight",
    ):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    expected = sum(p.numel() for p in model.parameters())
    assert model.num_parameters() == expected


def test_layernorm_is_torch_layernorm_with_bias_and_the_config_eps():
    model = tiny_model(norm_type="layernorm", rms_norm_eps=1e-5)
    norms = [model.model.norm] + [
        n for b in model.model.layers for n in (b.input_layernorm, b.post_attention_layernorm)
    ]
    assert all(isinstance(n, nn.LayerNorm) and n.bias is not None and n.eps == 1e-5 for n in norms)
    assert all(bool((n.weight == 1).all()) and not n.bias.any() for n in norms)  # reset_parameters' init
    ids = torch.randint(0, VOCAB, (2, 8))
    model(ids, labels=ids).loss.backward()
    assert model.model.norm.bias.grad.abs().sum() > 0
    hidden = torch.randn(3, HIDDEN)
    torch.testing.assert_close(model.model.norm(hidden), F.layer_norm(hidden, (HIDDEN,), eps=1e-5))


def test_dropout_acts_in_training_only_and_zero_changes_nothing():
    rates = dict(attention_dropout=0.3, hidden_dropout=0.3, expert_dropout=0.3)
    dropped, plain = tiny_model(**rates, first_k_dense_replace=1), tiny_model(first_k_dense_replace=1)
    plain.load_state_dict(dropped.state_dict())
    ids = torch.randint(0, VOCAB, (2, 8))
    dropped.eval(), plain.eval()
    torch.testing.assert_close(dropped(ids).logits, plain(ids).logits, atol=0, rtol=0)
    dropped.train(), plain.train()
    torch.manual_seed(1)
    first = dropped(ids).logits
    assert not torch.allclose(first, dropped(ids).logits)  # a fresh mask each forward
    torch.manual_seed(1)
    assert torch.equal(first, dropped(ids).logits)  # ... drawn from torch's generator
    assert torch.equal(plain(ids).logits, plain(ids).logits)  # rate 0: no randomness at all
    for name, rate in rates.items():  # each rate alone has an effect
        one = tiny_model(**{name: rate}, first_k_dense_replace=1)
        one.load_state_dict(plain.state_dict())
        assert not torch.allclose(one(ids).logits, plain(ids).logits), name


def test_bidirectional_attention_sees_later_tokens_but_not_padding():
    causal, encoder = tiny_model(), tiny_model(is_causal=False)
    encoder.load_state_dict(causal.state_dict())
    causal.eval(), encoder.eval()
    ids = torch.randint(0, VOCAB, (1, 8))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % VOCAB
    torch.testing.assert_close(causal(ids).logits[:, :-1], causal(changed).logits[:, :-1])
    assert not torch.allclose(encoder(ids).logits[:, 0], encoder(changed).logits[:, 0])
    mask = torch.ones(1, 8, dtype=torch.long)
    mask[0, -1] = 0  # the changed token is padding now: no real position may see it
    torch.testing.assert_close(
        encoder(ids, attention_mask=mask).logits[:, :-1], encoder(changed, attention_mask=mask).logits[:, :-1]
    )
    # masked-LM: labels at the positions themselves, ignored elsewhere; the model computes their cross-entropy
    labels = torch.full_like(ids, -100)
    labels[0, 3] = ids[0, 3]
    out = encoder(ids, labels=labels)
    torch.testing.assert_close(out.lm_loss, F.cross_entropy(out.logits[0, 3:4], ids[0, 3:4]))
    with pytest.raises(ValueError, match="is_causal=false.*cannot generate"):
        encoder.generate(ids, 2)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"attention_dropout": 1.0}, "model.attention_dropout=1.0 must be in \\[0, 1\\)"),
        ({"expert_dropout": -0.1}, "model.expert_dropout=-0.1 must be in"),
        ({"hidden_act": "relu"}, "model.hidden_act='relu'"),
        ({"norm_type": "batchnorm"}, "model.norm_type='batchnorm'"),
        ({"moe": {"expert_activation": "geglu"}}, "expert_activation='geglu'"),
        ({"is_causal": False, "num_nextn_predict_layers": 1}, "num_nextn_predict_layers=1 with model.is_causal=false"),
        ({"is_causal": False, "sliding_window": 4}, "sliding_window=4 with model.is_causal=false"),
    ],
)
def test_bad_tutorial_options_are_named_with_their_fix(fields, message):
    with pytest.raises(ConfigError, match=message):
        validate(config_from_dict({"model": fields}))


def test_the_trainer_refuses_an_encoder_on_next_token_labels():
    with pytest.raises(ConfigError, match="is_causal=false with data.train_prefixes.*masked-LM"):
        validate(config_from_dict({"model": {"is_causal": False}, "data": {"train_prefixes": ["x"]}}))


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"moe": {"expert_activation": "gelu"}}, "expert_activation='gelu'"),
        ({"hidden_act": "gelu", "first_k_dense_replace": 1}, "hidden_act='gelu'"),
        ({"norm_type": "layernorm"}, "norm_type='layernorm'"),
        ({"is_causal": False}, "is_causal=false"),
    ],
)
def test_export_refuses_what_no_hf_format_computes(tmp_path, fields, reason):
    model = tiny_model(**fields)
    for name in ("auto", "gpt_oss"):  # gpt_oss has expert biases and another activation, but not these
        with pytest.raises(CheckpointError, match=f"nothing was written(.|\\n)*{reason}"):
            export_hf(model, tmp_path / name, name)
        assert not (tmp_path / name).exists()
    with pytest.raises(CheckpointError, match="Megatron-Core"):
        megatron_state_dict(model)


def test_export_writes_attention_dropout_and_notes_the_training_only_rates(tmp_path, capsys):
    model = tiny_model(attention_dropout=0.1, hidden_dropout=0.2)
    export_hf(model, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["attention_dropout"] == 0.1
    assert "hidden_dropout act only in training" in capsys.readouterr().err


TUTORIAL = {
    "hidden_act": "gelu",
    "first_k_dense_replace": 1,
    "norm_type": "layernorm",
    "attention_dropout": 0.1,
    "hidden_dropout": 0.1,
    "expert_dropout": 0.1,
    "candidate_head": True,
}


def test_a_tutorial_model_trains_resumes_bit_exact_and_loads_whole(tmp_path):
    """The trainer with every option on (dropout included: its masks come from the RNG state the checkpoint
    keeps): 4 steps == 2 steps, save, resume, 2 more; the checkpoint holds no gate matrix and loads whole."""
    options = dict(model=TUTORIAL, moe={"expert_activation": "gelu", "n_shared_experts": 1})
    _, _, straight = train_in_process(
        tmp_path / "a", 4, config=conftest_tiny_config(tmp_path / "a", max_steps=4, **options)
    )
    config = conftest_tiny_config(tmp_path / "b", max_steps=4, **options)
    train_in_process(tmp_path / "b", 2, save_at=(2,), config=config)
    _, _, resumed = train_in_process(tmp_path / "b", 4, config=config)
    assert resumed == straight[2:]
    model, loaded, _ = load_model(tmp_path / "b" / "run" / "checkpoints", step=2)
    assert loaded.model.norm_type == "layernorm" and model.candidate_head is not None
    assert "model.layers.1.mlp.experts.w_up" in model.state_dict()
    assert not any("w_gate" in key for key in model.state_dict())
    swiglu = conftest_tiny_config(tmp_path / "b", max_steps=4, model=TUTORIAL, moe={"n_shared_experts": 1})
    with pytest.raises(CheckpointError, match="model.moe.expert_activation: checkpoint 'gelu', this run 'swiglu'"):
        train_in_process(tmp_path / "b", 4, config=swiglu)


def test_activation_checkpointing_replays_the_dropout_masks():
    rates = dict(attention_dropout=0.3, hidden_dropout=0.3, expert_dropout=0.3, first_k_dense_replace=1)
    plain, recomputed = tiny_model(**rates), tiny_model(**rates, gradient_checkpointing=True)
    recomputed.load_state_dict(plain.state_dict())
    ids = torch.randint(0, VOCAB, (2, 8))
    grads = []
    for model in (plain, recomputed):
        torch.manual_seed(4)
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for mine, theirs in zip(*grads):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-5)


def test_verify_switches_dropout_off_with_router_noise():
    config = config_from_dict(
        {"model": {"attention_dropout": 0.1, "expert_dropout": 0.2, "moe": {"router_noise_std": 1.0}}}
    )
    quiet = without_randomness(config).model
    assert (quiet.attention_dropout, quiet.hidden_dropout, quiet.expert_dropout, quiet.moe.router_noise_std) == (
        0,
        0,
        0,
        0,
    )


def test_lora_adapts_the_two_weights_gelu_experts_have():
    model = tiny_model(moe={"expert_activation": "gelu"})
    assert add_lora(model, rank=2, alpha=4.0, targets=["experts"]) == 2 * model.config.num_hidden_layers
    ids = torch.randint(0, VOCAB, (2, 8))
    model(ids, labels=ids).loss.backward()
