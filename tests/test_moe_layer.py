"""The MoE layer against a plain per-token reference, capacity policies, routing rules and balancing."""

import pytest
import torch
import torch.nn.functional as F

from mymoe.config import MoEConfig
from mymoe.model.moe.overflow import capacity_keep_mask, compute_capacity
from mymoe.model.moe.layer import MoELayer
from mymoe.model.moe.router import balanced_assignment

HIDDEN = 16


def reference_keep(indices, weights, num_experts, capacity, policy):
    """Which assignments survive capacity, decided one assignment at a time in priority order."""
    tokens, k = indices.shape
    if capacity is None:
        return torch.ones(tokens, k, dtype=torch.bool)
    if policy == "position":
        order = [(t, c) for c in range(k) for t in range(tokens)]
    else:
        flat = [(float(weights[t, c]), t * k + c, t, c) for t in range(tokens) for c in range(k)]
        order = [(t, c) for _, _, t, c in sorted(flat, key=lambda item: (-item[0], item[1]))]
    used = [0] * num_experts
    keep = torch.zeros(tokens, k, dtype=torch.bool)
    for t, c in order:
        expert = int(indices[t, c])
        if used[expert] < capacity:
            used[expert] += 1
            keep[t, c] = True
    return keep


def reference_moe(x, router_weight, w_gate, w_up, w_down, moe: MoEConfig, capacity, shared=None):
    """Loop over tokens and their chosen experts: the definition the fast layer must match."""
    logits = x @ router_weight.t()
    scores = torch.softmax(logits, -1) if moe.scoring_func == "softmax" else torch.sigmoid(logits)
    indices = torch.topk(scores.detach(), moe.num_experts_per_tok, dim=-1).indices
    weights = scores.gather(1, indices)
    if moe.norm_topk_prob and moe.num_experts_per_tok > 1:
        weights = weights / weights.sum(-1, keepdim=True)
    weights = weights * moe.routed_scaling_factor
    keep = reference_keep(indices, weights.detach(), router_weight.shape[0], capacity, moe.drop_policy)
    rows = []
    for t in range(x.shape[0]):
        out = torch.zeros(x.shape[1])
        for c in range(moe.num_experts_per_tok):
            if keep[t, c]:
                e = int(indices[t, c])
                expert_out = (F.silu(x[t] @ w_gate[e]) * (x[t] @ w_up[e])) @ w_down[e]
                out = out + weights[t, c] * expert_out
        if shared is not None:
            out = out + shared(x[t])
        rows.append(out)
    return torch.stack(rows), keep


def make_layer(seed=0, **moe_kwargs):
    moe = MoEConfig(
        **{
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "router_aux_loss_coef": 0.0,
            **moe_kwargs,
        }
    )
    torch.manual_seed(seed)
    layer = MoELayer(HIDDEN, moe, init_std=0.3)
    return layer, moe


@pytest.mark.parametrize("grouped_mm,chunked", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize(
    "capacity_factor,policy", [(None, "probs"), (1.0, "probs"), (0.5, "position"), (1.0, "position")]
)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_layer_matches_per_token_reference(capacity_factor, policy, scoring, grouped_mm, chunked):
    layer, moe = make_layer(
        capacity_factor=capacity_factor,
        drop_policy=policy,
        scoring_func=scoring,
        min_capacity=0,
        n_shared_experts=1,
        routed_scaling_factor=1.5,
    )
    layer.experts.use_grouped_mm = grouped_mm
    if chunked:
        layer.experts.chunk_bytes = 1  # one expert per chunk
    x = torch.randn(24, HIDDEN, requires_grad=True)
    out, aux = layer(x)
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()

    x_ref = x.detach().clone().requires_grad_(True)
    params = [
        p.detach().clone().requires_grad_(True)
        for p in (layer.gate.weight, layer.experts.w_gate, layer.experts.w_up, layer.experts.w_down)
    ]
    capacity = compute_capacity(24, 8, 2, capacity_factor, 0)
    expected, keep = reference_moe(x_ref, *params, moe, capacity, shared=layer.shared_experts)
    (expected * grad_out).sum().backward()

    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    for mine, ref in zip((layer.gate.weight, layer.experts.w_gate, layer.experts.w_up, layer.experts.w_down), params):
        torch.testing.assert_close(mine.grad, ref.grad, atol=1e-5, rtol=1e-5)
    assert int(aux.tokens_per_expert.sum()) == int(keep.sum())
    assert float(aux.dropped_fraction) == pytest.approx(1 - float(keep.float().mean()))
    if capacity_factor is not None and capacity_factor < 1:
        assert float(aux.dropped_fraction) > 0


@pytest.mark.parametrize("grouped_mm", [True, False])
def test_expert_without_tokens_gets_zero_gradient(grouped_mm):
    layer, _ = make_layer()
    layer.experts.use_grouped_mm = grouped_mm
    with torch.no_grad():
        layer.gate.weight[3] = -10.0  # expert 3 never wins against the others for positive inputs
    x = torch.rand(16, HIDDEN)
    out, aux = layer(x)
    # freed NaN buffers of the gradients' sizes: an unwritten gradient would likely be handed one back
    for name in ("w_gate", "w_up", "w_down"):
        del_me = torch.full_like(getattr(layer.experts, name), float("nan"))
        del del_me
    out.sum().backward()
    assert int(aux.tokens_per_expert[3]) == 0
    for name in ("w_gate", "w_up", "w_down"):
        grad = getattr(layer.experts, name).grad
        assert torch.count_nonzero(grad[3]) == 0, name
        assert torch.isfinite(grad).all(), name


def test_capacity_policies_on_a_hand_built_case():
    # 4 tokens, top-1, 2 experts, capacity 2: tokens 0, 1, 2 all choose expert 0, token 3 expert 1
    indices = torch.tensor([[0], [0], [0], [1]])
    weights = torch.tensor([[0.2], [0.9], [0.5], [0.7]])
    by_probs = capacity_keep_mask(indices, weights, 2, capacity=2, policy="probs")
    assert by_probs.view(-1).tolist() == [False, True, True, True]  # the weakest (token 0) is dropped
    by_position = capacity_keep_mask(indices, weights, 2, capacity=2, policy="position")
    assert by_position.view(-1).tolist() == [True, True, False, True]  # the latest (token 2) is dropped

    # top-2, position policy: every first choice is placed before any second choice
    indices = torch.tensor([[1, 0], [1, 0], [0, 1]])
    weights = torch.full((3, 2), 0.5)
    keep = capacity_keep_mask(indices, weights, 2, capacity=2, policy="position")
    # expert 1 takes first choices of tokens 0, 1; token 2's second choice (expert 1) is dropped
    # expert 0 takes token 2's first choice, then token 0's second choice; token 1's second is dropped
    assert keep.tolist() == [[True, True], [True, False], [True, False]]


def test_chunks_hold_whole_experts():
    from mymoe.model.moe.experts import plan_chunks

    assert plan_chunks([3, 0, 4, 5, 1], max_rows=6) == [(0, 2, 0, 3), (2, 3, 3, 7), (3, 5, 7, 13)]
    assert plan_chunks([10, 2], max_rows=4) == [(0, 1, 0, 10), (1, 2, 10, 12)]  # a big expert stays whole
    assert plan_chunks([0, 0], max_rows=4) == [(0, 2, 0, 0)]


def test_capacity_formula_and_dropless():
    assert compute_capacity(100, 8, 2, None) is None
    assert compute_capacity(100, 8, 2, 1.0) == 25
    assert compute_capacity(100, 8, 2, 1.25) == 32  # ceil(31.25)
    assert compute_capacity(4, 8, 1, 1.0, min_capacity=4) == 4


def test_eval_capacity_factor_applies_in_eval_mode():
    layer, _ = make_layer(capacity_factor=0.5, eval_capacity_factor=2.0, min_capacity=0)
    assert layer.capacity(64) == 8
    layer.eval()
    assert layer.capacity(64) == 32


def test_group_limited_routing_stays_in_chosen_groups():
    layer, moe = make_layer(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, scoring_func="sigmoid")
    x = torch.randn(256, HIDDEN)
    routing = layer.gate(x)
    scores = torch.sigmoid(routing.router_logits).view(256, 4, 4)
    group_scores = scores.topk(2, dim=-1).values.sum(-1)  # DeepSeek-V3: sum of the two best per group
    chosen_groups = group_scores.topk(2, dim=-1).indices
    picked_groups = routing.expert_indices // 4
    for token in range(256):
        assert set(picked_groups[token].tolist()) <= set(chosen_groups[token].tolist())
    # and without the limit some tokens would have picked outside them (the test can fail)
    free_layer, _ = make_layer(n_routed_experts=16, num_experts_per_tok=4, scoring_func="sigmoid")
    free_layer.gate.weight.data.copy_(layer.gate.weight.data)
    free = free_layer.gate(x).expert_indices // 4
    assert any(not set(free[t].tolist()) <= set(chosen_groups[t].tolist()) for t in range(256))


def test_bias_balancing_moves_load_toward_uniform():
    layer, _ = make_layer(bias_update_rate=0.01, scoring_func="sigmoid")
    with torch.no_grad():
        layer.gate.weight[0] += 0.05  # a skewed router: inputs share a direction that experts 0, 1 favour
        layer.gate.weight[1] += 0.03
    torch.manual_seed(1)
    x = torch.randn(512, HIDDEN) + 1.0

    def load():
        return layer(x)[1].tokens_per_expert.float()

    layer.train()
    weight_before = layer.gate.weight.detach().clone()
    load_before = load()
    before = float(load_before.max() / load_before.mean())
    layer._pending_load = None
    for _ in range(200):
        layer(x)
        layer.update_expert_bias(layer.pending_load())
    load_after = load()
    after = float(load_after.max() / load_after.mean())
    assert before > 2.0
    assert after < 1.3
    assert layer.gate.expert_bias[load_before.argmax()] < 0  # the busiest expert was pushed down
    assert torch.equal(layer.gate.weight, weight_before)  # by the selection bias alone


def test_router_noise_only_in_training_and_seeded():
    layer, _ = make_layer(router_noise_std=1.0, router_jitter_noise=0.1)
    x = torch.randn(64, HIDDEN)
    layer.eval()
    first = layer.gate(x).expert_indices
    assert torch.equal(first, layer.gate(x).expert_indices)  # eval: deterministic, no noise
    layer.train()
    torch.manual_seed(5)
    a = layer.gate(x).expert_indices
    torch.manual_seed(5)
    b = layer.gate(x).expert_indices
    assert torch.equal(a, b)  # noise is reproducible under a seed
    assert not torch.equal(a, first)  # and it does change choices


def test_aux_losses_have_their_textbook_values():
    layer, _ = make_layer(router_aux_loss_coef=0.1, seq_aux_loss_coef=0.2, router_z_loss_coef=0.3)
    with torch.no_grad():
        layer.gate.weight.zero_()  # uniform router: balanced loss is exactly 1 whatever the choices
    x = torch.randn(2, 8, HIDDEN)
    routing = layer.gate(x.view(-1, HIDDEN), (2, 8))
    assert float(routing.load_balancing_loss) == pytest.approx(1.0, abs=1e-6)
    assert float(routing.seq_aux_loss) == pytest.approx(1.0, abs=1e-6)
    assert float(routing.z_loss) == pytest.approx(torch.log(torch.tensor(8.0)).item() ** 2, rel=1e-5)
    expected = 0.1 * 1.0 + 0.2 * 1.0 + 0.3 * float(routing.z_loss)
    assert float(routing.aux_loss.detach()) == pytest.approx(expected, rel=1e-5)


def test_shared_expert_gate_scales_shared_output():
    layer, _ = make_layer(n_shared_experts=1, shared_expert_gate=True)
    x = torch.randn(10, HIDDEN)
    out, _ = layer(x)
    with torch.no_grad():
        layer.shared_expert_gate.weight.fill_(-1e4)  # gate closed for these inputs' positive sums...
    x_pos = x.abs() + 0.1
    closed, _ = layer(x_pos)
    layer.shared_experts = None
    layer.shared_expert_gate = None
    routed_only, _ = layer(x_pos)
    torch.testing.assert_close(closed, routed_only, atol=1e-6, rtol=0)
    assert out.shape == x.shape


def test_checkpointed_and_plain_layers_give_same_gradients():
    from torch.utils.checkpoint import checkpoint

    layer, _ = make_layer(capacity_factor=1.0, router_aux_loss_coef=0.01, router_noise_std=0.5)
    x = torch.randn(2, 12, HIDDEN, requires_grad=True)

    def run(use_checkpoint):
        layer.zero_grad()
        x.grad = None
        layer._pending_load = None
        torch.manual_seed(7)
        if use_checkpoint:
            out, aux = checkpoint(layer, x, use_reentrant=False)
        else:
            out, aux = layer(x)
        (out.square().sum() + aux.aux_loss).backward()
        return [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()], layer.pending_load().clone()

    plain, plain_load = run(False)
    recomputed, recomputed_load = run(True)
    for a, b in zip(plain, recomputed):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert torch.equal(plain_load, recomputed_load)  # the recompute does not count the load twice


@pytest.mark.parametrize("tokens,experts,top_k", [(64, 8, 2), (48, 6, 3), (37, 8, 2), (5, 4, 4)])
def test_balanced_assignment_loads_are_equal_and_experts_distinct(tokens, experts, top_k):
    generator = torch.Generator().manual_seed(0)
    indices = balanced_assignment(tokens, experts, top_k, torch.device("cpu"), generator)
    assert indices.shape == (tokens, top_k)
    counts = torch.bincount(indices.flatten(), minlength=experts)
    if tokens * top_k % experts == 0:
        assert torch.all(counts == tokens * top_k // experts)
    assert int(counts.max() - counts.min()) <= 1
    assert all(len(set(row.tolist())) == top_k for row in indices)  # no expert twice for one token


def test_force_balanced_routing_equalises_a_skewed_router_and_still_trains_it():
    torch.manual_seed(1)
    x = torch.randn(512, HIDDEN) + 1.0
    loads = {}
    for forced in (False, True):
        layer, _ = make_layer(force_balanced_routing=forced)
        with torch.no_grad():
            layer.gate.weight[0] += 0.05  # inputs share a direction that expert 0 favours
        torch.manual_seed(2)
        output, aux = layer(x)
        loads[forced] = aux.tokens_per_expert
        output.square().sum().backward()
    assert int(loads[False].max()) > 2 * 512 * 2 // 8  # the natural choice is skewed ...
    assert torch.all(loads[True] == 512 * 2 // 8)  # ... the forced one gives every expert the same load
    assert layer.gate.weight.grad.abs().sum() > 0  # the combine weights are still the router's probabilities
    torch.manual_seed(2)
    routing = layer.gate(x)
    logits = x @ layer.gate.weight.t()
    expected = logits.gather(1, routing.expert_indices).softmax(-1)  # norm_topk_prob over the assigned experts
    torch.testing.assert_close(routing.expert_weights, expected)
