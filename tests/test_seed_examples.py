"""The four examples of the seed-004 design document ("MoE Transformer", Hugging Face style), written as its
user would, with only `from mymoe import MoEModelConfig, TransformerForCausalLM`. The document is not in our
workspace: the examples are rebuilt from what issue 17 says of them (their titles and the names they use)."""

from __future__ import annotations

import torch

from mymoe import MoEModelConfig, TransformerForCausalLM


def small_config(**options) -> MoEModelConfig:
    return MoEModelConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        aux_loss_coef=0.01,
        **options,
    )


def test_quick_start():
    torch.manual_seed(0)
    model = TransformerForCausalLM(small_config())
    input_ids = torch.randint(0, 128, (2, 16))
    outputs = model(input_ids=input_ids, labels=input_ids)
    outputs.loss.backward()
    assert outputs.logits.shape == (2, 16, 128)
    torch.testing.assert_close(outputs.loss, outputs.lm_loss + outputs.aux_loss)
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_training_with_moe():
    torch.manual_seed(0)
    model = TransformerForCausalLM(small_config(use_bias_balancing=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    input_ids = torch.randint(0, 128, (4, 32))
    losses = []
    for step in range(8):
        outputs = model(input_ids=input_ids, labels=input_ids, step=step)
        optimizer.zero_grad()
        outputs.loss.backward()
        optimizer.step()
        for layer in model.iter_moe_layers():  # aux-loss-free balancing: move the biases by the load
            layer.update_expert_bias(layer.pending_load())
        losses.append(outputs.loss.item())
    print("losses:", [round(loss, 3) for loss in losses])
    assert losses[-1] < losses[0] - 0.5


def test_expert_monitoring():
    torch.manual_seed(0)
    model = TransformerForCausalLM(small_config())
    outputs = model(input_ids=torch.randint(0, 128, (2, 16)), output_expert_usage=True)
    usage, imbalances = outputs.expert_usage, outputs.imbalances
    for layer, (fractions, imbalance) in enumerate(zip(usage, imbalances)):
        print(f"layer {layer}: usage {[round(f, 3) for f in fractions.tolist()]} imbalance {imbalance:.2f}")
    assert usage.shape == (2, 8) and imbalances.shape == (2,)
    torch.testing.assert_close(usage.sum(-1), torch.ones(2))
    assert bool((imbalances >= 1).all())
    torch.testing.assert_close(imbalances, usage.max(-1).values / usage.mean(-1))
    assert model(input_ids=torch.randint(0, 128, (2, 16))).expert_usage is None  # only when asked


def test_custom_routing():
    torch.manual_seed(0)
    input_ids = torch.randint(0, 128, (2, 16))
    for options in (
        dict(scoring_func="identity", norm_topk_prob=False),
        dict(topk_method="noaux_tc", n_group=4, topk_group=2, router_scaling_factor=2.5),
        dict(expert_capacity_factor=1.0, use_null_expert=True),
    ):
        model = TransformerForCausalLM(small_config(**options))
        outputs = model(input_ids=input_ids, labels=input_ids, output_expert_usage=True)
        outputs.loss.backward()
        print(options, "imbalances", outputs.imbalances.tolist())
        assert torch.isfinite(outputs.loss)
    capped = TransformerForCausalLM(small_config(expert_capacity_factor=1.0, use_null_expert=True)).eval()
    assert capped.config.moe.capacity_factor == 1.0 and capped.config.moe.overflow_policy == "null_expert"
    loss, logits = capped(input_ids=input_ids, labels=input_ids, return_dict=False)
    assert logits.shape == (2, 16, 128) and loss.ndim == 0
