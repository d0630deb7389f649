"""A few training steps under DP = 2 x EP = 2 on 4 ranks equal one process training on the global batch.

Why the router's load-balancing loss is off here: it multiplies two batch means (E * sum f_i P_i), so the
mean of four ranks' losses is not the loss of their concatenated batch, and no layout could match it.
The sequence-level balance loss and the z-loss are means over sequences and tokens, which do split over
ranks, so they stay on and their gradients are checked too.
"""

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from mymoe.model.moe.experts import is_expert
from mymoe.config import Config, ModelConfig, MoEConfig, ParallelConfig
from mymoe.model import MoECausalLM
from mymoe.parallel import clip_grad_norm_, init_distributed, parallelize, reduce_gradients, shutdown

STEPS, SEQUENCES_PER_RANK, SEQ_LEN, MAX_NORM = 3, 2, 8, 0.05
TOLERANCE = 1e-5


def tiny_config(expert_parallel_size: int) -> Config:
    moe = MoEConfig(
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        n_shared_experts=1,
        router_aux_loss_coef=0.0,
        seq_aux_loss_coef=0.01,
        router_z_loss_coef=0.001,
    )
    model = ModelConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        first_k_dense_replace=1,
        moe=moe,
    )
    parallel = ParallelConfig(expert_parallel_size=expert_parallel_size, backend="gloo", timeout_seconds=30)
    return Config(model=model, parallel=parallel)


def global_batch(step: int, world_size: int):
    generator = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, 64, (world_size * SEQUENCES_PER_RANK, SEQ_LEN + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def build(config: Config) -> MoECausalLM:
    torch.manual_seed(0)
    return MoECausalLM(config.model)


def optimizer(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)


def training_worker(rank: int, world_size: int) -> dict:
    config = tiny_config(expert_parallel_size=2)
    ctx = init_distributed(config)
    try:
        model = parallelize(build(config), ctx)
        reference = build(config)
        model_optimizer, reference_optimizer = optimizer(model), optimizer(reference)
        history = []
        for step in range(STEPS):
            input_ids, labels = global_batch(step, world_size)
            mine = slice(rank * SEQUENCES_PER_RANK, (rank + 1) * SEQUENCES_PER_RANK)

            model.zero_grad(set_to_none=True)
            loss = model(input_ids[mine], shift_labels=labels[mine]).loss
            loss.backward()
            reduce_gradients(model, ctx)
            norm = clip_grad_norm_(model, MAX_NORM, ctx)
            model_optimizer.step()
            global_loss = loss.detach().clone()
            dist.all_reduce(global_loss)
            global_loss /= world_size

            reference.zero_grad(set_to_none=True)
            reference_loss = reference(input_ids, shift_labels=labels).loss
            reference_loss.backward()
            reference_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), MAX_NORM)
            reference_optimizer.step()
            history.append((global_loss.item(), reference_loss.item(), norm.item(), reference_norm.item()))

        reference_params = dict(reference.named_parameters())
        worst = 0.0
        for name, param in model.named_parameters():
            expected = reference_params[name].detach()
            if is_expert(param):
                first, count = ctx.local_experts(config.model.moe.n_routed_experts)
                expected = expected[first : first + count]
            worst = max(worst, (param.detach() - expected).abs().max().item())
        return {"history": history, "worst parameter difference": worst}
    finally:
        shutdown()


@pytest.mark.slow
def test_dp2_x_ep2_training_matches_single_process():
    results = run_distributed(training_worker, world_size=4, init_process_group=False, timeout=60)
    for result in results:
        for step, (loss, reference_loss, norm, reference_norm) in enumerate(result.value["history"]):
            assert abs(loss - reference_loss) <= TOLERANCE, (
                f"rank {result.rank} step {step}: loss {loss} vs {reference_loss}"
            )
            assert abs(norm - reference_norm) <= TOLERANCE, (
                f"rank {result.rank} step {step}: norm {norm} vs {reference_norm}"
            )
            assert norm > MAX_NORM, "the test means to exercise clipping"
        assert result.value["worst parameter difference"] <= TOLERANCE, result.value
