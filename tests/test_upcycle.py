"""Dense-to-MoE upcycling: the upcycled model computes the dense model's function at initialisation."""

import pytest
import torch

from mymoe.config import ModelConfig, MoEConfig
from mymoe.model.transformer import MoECausalLM
from mymoe.upcycle import upcycle

DENSE = dict(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    first_k_dense_replace=3,
)


def dense_model(**overrides):
    torch.manual_seed(0)
    return MoECausalLM(ModelConfig(**{**DENSE, **overrides})).eval()


def moe_config(**overrides):
    return MoEConfig(
        **{
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "norm_topk_prob": True,
            "capacity_factor": None,
            **overrides,
        }
    )


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("router_init_std", [0.0, 0.5])
@pytest.mark.parametrize("tie", [False, True])
def test_upcycled_logits_equal_dense_logits(scoring, router_init_std, tie):
    dense = dense_model(tie_word_embeddings=tie)
    moe = upcycle(dense, moe_config(scoring_func=scoring), router_init_std=router_init_std).eval()
    ids = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(1))
    assert all(block.is_moe for block in moe.model.layers)
    torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)


def test_from_state_dict_with_dense_first_layer_and_shared_expert():
    dense = dense_model()
    moe = upcycle(
        dense.state_dict(), moe_config(n_shared_experts=1), dense_config=dense.config, first_k_dense_replace=1
    ).eval()
    assert [block.is_moe for block in moe.model.layers] == [False, True, True]
    ids = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)
    experts = moe.model.layers[2].mlp.experts
    for expert in range(4):
        assert torch.equal(experts.w_down[expert], dense.model.layers[2].mlp.down_proj.weight.t())
    assert moe.model.layers[2].mlp.gate.weight.abs().sum() == 0  # router_init_std 0: uniform


def test_noise_makes_experts_differ_and_is_seeded():
    dense = dense_model()
    first = upcycle(dense, moe_config(), noise_std=0.01, seed=3)
    again = upcycle(dense, moe_config(), noise_std=0.01, seed=3)
    w_up = first.model.layers[0].mlp.experts.w_up
    assert not torch.equal(w_up[0], w_up[1])
    assert torch.equal(w_up, again.model.layers[0].mlp.experts.w_up)
    relative = (w_up[0] - dense.model.layers[0].mlp.up_proj.weight.t()).std().detach() / w_up[0].std().detach()
    assert 0.005 < float(relative) < 0.02


def test_refuses_a_model_that_is_not_all_dense():
    with pytest.raises(ValueError, match="first_k_dense_replace=1 but num_hidden_layers=3"):
        upcycle(dense_model(first_k_dense_replace=1), moe_config())
    with pytest.raises(ValueError, match="needs dense_config"):
        upcycle(dense_model().state_dict(), moe_config())


def test_a_gelu_dense_model_upcycles_into_gelu_experts_only():
    dense = dense_model(hidden_act="gelu")
    moe = upcycle(dense, moe_config(expert_activation="gelu")).eval()
    ids = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="hidden_act='gelu' but the experts expert_activation='swiglu'"):
        upcycle(dense, moe_config())
