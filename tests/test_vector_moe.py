"""The vector-to-vector MoE model: shapes, active parameters, and a fit a dense MLP of equal size cannot match."""

import pytest
import torch
from torch import nn

from mymoe.config import MoEConfig
from mymoe.model.layers import RMSNorm, SwiGLU
from mymoe.model.vector import VectorMoE

FEATURES, HIDDEN, EXPERTS, EXPERT_WIDTH = 4, 32, 8, 16


def piecewise_linear(num_rows, generator, regions=8):
    """y = W_r x + b_r, the region r the argmax of fixed random projections of x: 8 unrelated linear maps."""
    fixed = torch.Generator().manual_seed(123)
    boundaries = torch.randn(FEATURES, regions, generator=fixed)
    maps = torch.randn(regions, FEATURES, FEATURES, generator=fixed)
    offsets = torch.randn(regions, FEATURES, generator=fixed)
    x = torch.rand(num_rows, FEATURES, generator=generator) * 2 - 1
    region = (x @ boundaries).argmax(-1)
    return x, torch.einsum("nij,nj->ni", maps[region], x) + offsets[region]


class DenseMLP(nn.Module):
    """The MoE model's shape with one SwiGLU in place of the MoE layer."""

    def __init__(self, width):
        super().__init__()
        self.input_proj = nn.Linear(FEATURES, HIDDEN)
        self.mlp_norm = RMSNorm(HIDDEN)
        self.mlp = SwiGLU(HIDDEN, width)
        self.norm = RMSNorm(HIDDEN)
        self.output_proj = nn.Linear(HIDDEN, FEATURES)

    def forward(self, x):
        hidden = self.input_proj(x)
        hidden = hidden + self.mlp(self.mlp_norm(hidden))
        return self.output_proj(self.norm(hidden))


def moe_model(seed=0, **moe_kwargs):
    torch.manual_seed(seed)
    moe = MoEConfig(
        **{
            "n_routed_experts": EXPERTS,
            "num_experts_per_tok": 1,
            "moe_intermediate_size": EXPERT_WIDTH,
            "router_aux_loss_coef": 0.01,
            **moe_kwargs,
        }
    )
    return VectorMoE(FEATURES, FEATURES, HIDDEN, moe, init_std=0.1)


def test_shapes_stats_and_active_parameters():
    model = moe_model(num_experts_per_tok=2, capacity_factor=1.0, overflow_policy="spill")
    out = model(torch.randn(10, FEATURES))
    assert out.output.shape == (10, FEATURES) and out.aux_loss.dim() == 0
    assert len(out.router_stats) == 1 and int(out.router_stats[0]["tokens_per_expert"].sum()) <= 20
    per_expert = 3 * HIDDEN * EXPERT_WIDTH
    assert model.num_parameters() - model.num_parameters(active_only=True) == (EXPERTS - 2) * per_expert
    with pytest.raises(ValueError, match=r"\[N, in_features\]"):
        model(torch.randn(2, 5, FEATURES))


def test_fits_piecewise_linear_target_better_than_dense_mlp_of_equal_active_size():
    generator = torch.Generator().manual_seed(0)
    train_x, train_y = piecewise_linear(4096, generator)
    test_x, test_y = piecewise_linear(2048, generator)
    moe = moe_model()
    # the dense FFN gets as many parameters as the expert a row uses plus the router, rounded up
    router_parameters = EXPERTS * HIDDEN
    torch.manual_seed(0)
    dense = DenseMLP(EXPERT_WIDTH + -(-router_parameters // (3 * HIDDEN)))
    assert sum(p.numel() for p in dense.parameters()) >= moe.num_parameters(active_only=True)

    def train(model, forward):
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        batches = torch.Generator().manual_seed(1)
        for _ in range(400):
            rows = torch.randint(0, train_x.shape[0], (256,), generator=batches)
            prediction, aux_loss = forward(train_x[rows])
            loss = (prediction - train_y[rows]).square().mean() + aux_loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            return float((forward(test_x)[0] - test_y).square().mean())

    def moe_forward(x):
        out = moe(x)
        return out.output, out.aux_loss

    moe_loss = train(moe, moe_forward)
    dense_loss = train(dense, lambda x: (dense(x), 0.0))
    print(f"test MSE: MoE {moe_loss:.3f}, dense {dense_loss:.3f}")
    assert moe_loss < 0.8 * dense_loss
