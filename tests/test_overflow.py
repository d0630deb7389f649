"""Overflow policies (drop, spill, null expert) and per-sequence protection against plain loop references."""

import pytest
import torch
import torch.nn.functional as F

from mymoe.config import ConfigError, MoEConfig, config_from_dict, validate
from mymoe.model.moe.layer import MoELayer
from mymoe.model.moe.overflow import compute_capacity, place_assignments, protected_first_choices

HIDDEN = 16


def reference_protected(weights, batch, seq_len, per_sequence):
    protected = torch.zeros(weights.shape, dtype=torch.bool)
    for b in range(batch):
        tokens = sorted(range(seq_len), key=lambda s: (-float(weights[b * seq_len + s, 0]), s))
        for s in tokens[:per_sequence]:
            protected[b * seq_len + s, 0] = True
    return protected


def reference_order(weights, policy, protected):
    tokens, k = weights.shape

    def key(tc):
        if policy == "position":
            return (not protected[tc], tc[1], tc[0])
        return (not protected[tc], -float(weights[tc]), tc[0] * k + tc[1])

    return sorted(((t, c) for t in range(tokens) for c in range(k)), key=key)


def reference_placement(indices, weights, logits, capacity, policy, overflow, protected):
    """One assignment at a time: capacity in priority order, then the spill rounds of overflow.py."""
    tokens, k = indices.shape
    num_experts = logits.shape[1]
    order = reference_order(weights, policy, protected)
    rank = {tc: i for i, tc in enumerate(order)}
    used = [0] * num_experts
    experts = indices.clone()
    keep = torch.zeros(tokens, k, dtype=torch.bool)
    spilled = torch.zeros(tokens, k, dtype=torch.bool)
    for t, c in order:
        e = int(indices[t, c])
        if used[e] < capacity or protected[t, c]:
            used[e] += 1
            keep[t, c] = True
    if overflow == "spill":
        alternatives = [
            sorted(
                (e for e in range(num_experts) if e not in indices[t].tolist()), key=lambda e: (-float(logits[t, e]), e)
            )
            for t in range(tokens)
        ]
        for round_index in range(num_experts - k):
            offers = []
            for t in range(tokens):
                waiting = [(rank[(t, c)], t, c) for c in range(k) if not keep[t, c]]
                if waiting:
                    offers.append(min(waiting))
            for _, t, c in sorted(offers):
                e = alternatives[t][round_index]
                if used[e] < capacity:
                    used[e] += 1
                    experts[t, c], keep[t, c], spilled[t, c] = e, True, True
    null = ~keep if overflow == "null_expert" else torch.zeros_like(keep)
    return experts, keep, spilled, null


def skewed_routing(tokens=64, num_experts=8, top_k=2, seed=0, skew=3.0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, num_experts, generator=generator)
    logits[:, :2] += skew  # experts 0 and 1 are everyone's favourites
    scores = logits.softmax(-1)
    weights, indices = scores.topk(top_k, dim=-1)
    return indices, weights / weights.sum(-1, keepdim=True), logits


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("overflow", ["drop", "spill", "null_expert"])
@pytest.mark.parametrize("per_sequence", [0, 3])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0])  # spill leaves some assignments dropped, or none
@pytest.mark.parametrize("seed", [0, 1])
def test_placement_matches_loop_reference(policy, overflow, per_sequence, capacity_factor, seed):
    indices, weights, logits = skewed_routing(seed=seed, skew=1.5)
    capacity = compute_capacity(64, 8, 2, capacity_factor)
    batch_shape = (4, 16)
    protected = reference_protected(weights, *batch_shape, per_sequence)
    got = place_assignments(
        indices,
        weights,
        logits,
        capacity=capacity,
        drop_policy=policy,
        overflow_policy=overflow,
        min_tokens_per_sequence_kept=per_sequence,
        batch_shape=batch_shape,
    )
    experts, keep, spilled, null = reference_placement(indices, weights, logits, capacity, policy, overflow, protected)
    assert torch.equal(got.keep, keep)
    assert torch.equal(got.expert_indices, experts)
    assert torch.equal(got.spilled, spilled)
    assert torch.equal(got.null, null)


def test_spill_drops_strictly_fewer_and_respects_capacity():
    indices, weights, logits = skewed_routing(tokens=256, seed=3)
    capacity = compute_capacity(256, 8, 2, 1.25)
    dropped = place_assignments(indices, weights, logits, capacity=capacity, overflow_policy="drop")
    spilled = place_assignments(indices, weights, logits, capacity=capacity, overflow_policy="spill")
    drop_fraction = float((~dropped.keep).float().mean())
    spill_fraction = float((~spilled.keep).float().mean())
    assert drop_fraction > 0.3  # the skewed router overloads experts 0 and 1
    assert spill_fraction < drop_fraction
    assert spill_fraction == 0.0  # 1.25x capacity has room for every assignment somewhere
    load = torch.bincount(spilled.expert_indices[spilled.keep], minlength=8)
    assert int(load.max()) <= capacity
    # every kept choice of the router stays where it was; a token never holds one expert twice
    unmoved = dropped.keep
    assert torch.equal(spilled.expert_indices[unmoved], indices[unmoved])
    sorted_experts = spilled.expert_indices.sort(dim=1).values
    assert bool((sorted_experts[:, 1:] != sorted_experts[:, :-1]).all())


def test_spill_at_tight_capacity_fills_every_expert_and_no_more():
    indices, weights, logits = skewed_routing(tokens=256, seed=4)
    capacity = compute_capacity(256, 8, 2, 0.5)  # room for half the assignments
    placement = place_assignments(indices, weights, logits, capacity=capacity, overflow_policy="spill")
    load = torch.bincount(placement.expert_indices[placement.keep], minlength=8)
    assert load.tolist() == [capacity] * 8


def test_protection_keeps_each_sequences_best_first_choices():
    indices, weights, logits = skewed_routing(tokens=64, seed=5, skew=6.0)
    capacity = 2  # far too small for 64 tokens that all want experts 0 and 1
    unprotected = place_assignments(indices, weights, logits, capacity=capacity, batch_shape=(4, 16))
    assert int(unprotected.keep[:, 0].view(4, 16).sum(1).min()) < 3  # some sequence loses almost everything
    placement = place_assignments(
        indices, weights, logits, capacity=capacity, min_tokens_per_sequence_kept=3, batch_shape=(4, 16)
    )
    protected = protected_first_choices(weights, (4, 16), 3)
    assert bool(placement.keep[protected].all())
    assert placement.keep[:, 0].view(4, 16).sum(1).tolist() >= [3] * 4
    # every first choice protected: none is ever dropped
    everything = place_assignments(
        indices, weights, logits, capacity=capacity, min_tokens_per_sequence_kept=16, batch_shape=(4, 16)
    )
    assert bool(everything.keep[:, 0].all())


def make_layer(**moe_kwargs):
    moe = MoEConfig(
        **{
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "router_aux_loss_coef": 0.0,
            "min_capacity": 0,
            **moe_kwargs,
        }
    )
    torch.manual_seed(0)
    layer = MoELayer(HIDDEN, moe, init_std=0.3)
    with torch.no_grad():
        layer.gate.weight[0] += 1.0  # skew the router toward expert 0
    return layer


def test_layer_output_follows_the_placement():
    layer = make_layer(capacity_factor=0.75, overflow_policy="spill")
    x = torch.randn(2, 12, HIDDEN) + 0.5
    out, aux = layer(x)
    tokens = x.reshape(-1, HIDDEN)
    routing = layer.gate(tokens, (2, 12))
    placement = place_assignments(
        routing.expert_indices,
        routing.expert_weights,
        routing.selection_scores,
        capacity=layer.capacity(24),
        overflow_policy="spill",
        batch_shape=(2, 12),
    )
    experts = layer.experts
    expected = torch.zeros_like(tokens)
    for t in range(24):
        for c in range(2):
            if placement.keep[t, c]:
                e = int(placement.expert_indices[t, c])
                hidden = F.silu(tokens[t] @ experts.w_gate[e]) * (tokens[t] @ experts.w_up[e])
                expected[t] += routing.expert_weights[t, c] * (hidden @ experts.w_down[e])
    torch.testing.assert_close(out.reshape(-1, HIDDEN), expected, atol=1e-5, rtol=1e-5)
    assert float(aux.spilled_fraction) == pytest.approx(float(placement.spilled.float().mean()))
    assert float(aux.spilled_fraction) > 0


def test_null_expert_gives_drop_output_with_its_own_accounting():
    x = torch.randn(32, HIDDEN) + 0.5
    drop_out, drop_aux = make_layer(capacity_factor=0.5)(x)
    null_out, null_aux = make_layer(capacity_factor=0.5, overflow_policy="null_expert")(x)
    torch.testing.assert_close(null_out, drop_out)
    assert float(drop_aux.dropped_fraction) > 0 and float(drop_aux.null_fraction) == 0
    assert float(null_aux.null_fraction) == pytest.approx(float(drop_aux.dropped_fraction))
    assert float(null_aux.dropped_fraction) == 0
    assert {"spilled_fraction", "null_fraction"} <= set(null_aux.stats)


@pytest.mark.parametrize(
    "values,message",
    [
        ({"overflow_policy": "reroute"}, "overflow_policy='reroute'"),
        ({"min_tokens_per_sequence_kept": -1}, "min_tokens_per_sequence_kept=-1"),
    ],
)
def test_bad_overflow_settings_are_named(values, message):
    with pytest.raises(ConfigError, match=message):
        validate(config_from_dict({"model": {"moe": values}}))


def test_spill_respects_group_limits_and_the_balancing_bias():
    # 8 experts in 4 groups, each token may use 2 groups; expert 7 is blocked by a very low bias
    layer = make_layer(
        capacity_factor=0.5,
        overflow_policy="spill",
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        scoring_func="sigmoid",
    )
    with torch.no_grad():
        layer.gate.expert_bias[7] = -1e4
    tokens = torch.randn(64, HIDDEN) + 0.5
    routing = layer.gate(tokens)
    placement = place_assignments(
        routing.expert_indices,
        routing.expert_weights,
        routing.selection_scores,
        capacity=layer.capacity(64),
        overflow_policy="spill",
    )
    assert bool(placement.spilled.any())
    allowed = torch.isfinite(routing.selection_scores)  # the experts of each token's chosen groups
    kept_experts = placement.expert_indices[placement.keep]
    kept_tokens = torch.arange(64)[:, None].expand(64, 2)[placement.keep]
    assert bool(allowed[kept_tokens, kept_experts].all())
    assert not bool((kept_experts == 7).any())
