"""Tokens/s of a full training step of the MoE model on one process, against its peers.

    python benchmarks/train.py [--repeats 5] [--layers 4] [--threads 2]

A step is what the trainer does per micro-batch minus communication: zero the gradients, forward with
the loss (language-model loss + aux loss), backward, AdamW step. Candidates, timed in the same run and
interleaved (every repeat times each once on the same batch, so drift in the machine's speed hits all of
them alike; the median repeat is reported):
  ours       MoECausalLM, every block's FFN our dropless MoELayer
  deepspeed  the same model with each MoE FFN replaced by deepspeed.moe.layer.MoE (ep_size=1,
             drop_tokens=False, top-2 without the sampled second expert, SwiGLU experts of the same shape)
  dense      the same model with a dense SwiGLU of top_k * moe_intermediate_size in every block: the
             weights one token touches in the MoE model, with no routing
All three start from the same seed and the model's own initialisation, and use the same AdamW settings
(mymoe.train.optim, TrainConfig defaults). Then (unless --no-layouts) the same model trains on 2 gloo
ranks, FSDP against the replicated layout (benchmarks/layouts.py). The last line reads
RESULT tokens_per_s=<ours> vs_deepspeed_moe=<ours / deepspeed tokens/s> vs_dense=<ours / dense step time>
       fsdp_tokens_per_s=<world 2> replicated_tokens_per_s=<world 2> fsdp_vs_replicated=<fsdp / replicated>
       fsdp_no_reshard_vs_replicated=<the same, blocks kept gathered from forward to backward>
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from mymoe.config import ModelConfig, MoEConfig, TrainConfig
from mymoe.model.layers import SwiGLU
from mymoe.model.transformer import MoECausalLM
from mymoe.optim import build_optimizer, parameter_groups
from peers import init_deepspeed, require_launch

MICRO_BATCH_SIZE = 8
SEQ_LEN = 256


def model_config(layers: int) -> ModelConfig:
    moe = MoEConfig(
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=1024,
        n_shared_experts=0,
        router_aux_loss_coef=0.01,
    )
    return ModelConfig(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=layers,
        num_attention_heads=8,
        max_position_embeddings=SEQ_LEN,
        moe=moe,
    )


@dataclass
class DeepSpeedAux:
    """The two fields of MoEAux the model reads."""

    aux_loss: torch.Tensor
    stats: dict


class DeepSpeedFFN(nn.Module):
    """deepspeed.moe.layer.MoE behind our Block's FFN interface: hidden -> (output, aux)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        from deepspeed.moe.layer import MoE

        moe = config.moe
        self.aux_loss_coef = moe.router_aux_loss_coef
        # drop_tokens=False pads every expert to the busiest one's count: DeepSpeed's dropless mode.
        # top2_2nd_expert_sampling adds Gumbel noise to the second choice; ours routes without noise
        self.moe = MoE(
            config.hidden_size,
            SwiGLU(config.hidden_size, moe.moe_intermediate_size),
            num_experts=moe.n_routed_experts,
            ep_size=1,
            k=moe.num_experts_per_tok,
            capacity_factor=1.0,
            eval_capacity_factor=1.0,
            min_capacity=0,
            noisy_gate_policy=None,
            drop_tokens=False,
            top2_2nd_expert_sampling=False,
        )

    def forward(self, hidden: torch.Tensor):
        output, load_balancing_loss, tokens_per_expert = self.moe(hidden)
        return output, DeepSpeedAux(
            self.aux_loss_coef * load_balancing_loss,
            {"tokens_per_expert": tokens_per_expert, "load_balancing_loss": load_balancing_loss.detach()},
        )


def build(name: str, config: ModelConfig) -> MoECausalLM:
    torch.manual_seed(0)
    if name == "dense":
        config = dataclasses.replace(
            config,
            first_k_dense_replace=config.num_hidden_layers,
            intermediate_size=config.moe.num_experts_per_tok * config.moe.moe_intermediate_size,
        )
    model = MoECausalLM(config)
    if name == "deepspeed":
        for block in model.model.layers:
            block.mlp = DeepSpeedFFN(config)
        # the same initialisation as ours (std 0.02, down_proj scaled by depth), not nn.Linear's default
        model.reset_parameters()
    return model.train()


class Candidate:
    def __init__(self, model: MoECausalLM):
        self.model = model
        train = TrainConfig()
        self.optimizer = build_optimizer(parameter_groups(model, train.weight_decay), train)

    def time_step(self, input_ids: torch.Tensor, labels: torch.Tensor) -> float:
        """Seconds of one training step: zero grads, forward with loss, backward, AdamW step."""
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        self.model(input_ids, shift_labels=labels).loss.backward()
        self.optimizer.step()
        return time.perf_counter() - start


def main(argv=None) -> None:
    require_launch("train.py", torchrun=False)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-layouts", action="store_true", help="skip FSDP against replicated at world 2")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with_deepspeed = init_deepspeed()
    config = model_config(args.layers)
    tokens = MICRO_BATCH_SIZE * SEQ_LEN
    result = {}
    try:
        names = ["ours"] + (["deepspeed"] if with_deepspeed else []) + ["dense"]
        candidates = {name: Candidate(build(name, config)) for name in names}
        print(
            f"training step (forward, backward, AdamW) of {', '.join(names)}: {args.layers} layers, hidden "
            f"{config.hidden_size}, vocab {config.vocab_size}, {config.moe.n_routed_experts} experts of "
            f"{config.moe.moe_intermediate_size}, top-{config.moe.num_experts_per_tok}, dense FFN "
            f"{config.moe.num_experts_per_tok * config.moe.moe_intermediate_size}; micro-batch "
            f"{MICRO_BATCH_SIZE} x {SEQ_LEN} = {tokens} tokens, fp32, {args.threads} threads; 1 warm-up + "
            f"{args.repeats} interleaved repeats, median"
        )
        generator = torch.Generator().manual_seed(0)
        batches = [
            torch.randint(0, config.vocab_size, (MICRO_BATCH_SIZE, SEQ_LEN + 1), generator=generator)
            for _ in range(args.repeats + 1)
        ]
        times = {name: [] for name in names}
        for repeat, batch in enumerate(batches):
            input_ids, labels = batch[:, :-1], batch[:, 1:]
            step_times = {name: candidate.time_step(input_ids, labels) for name, candidate in candidates.items()}
            label = "warm-up" if repeat == 0 else f"repeat {repeat}/{args.repeats}"
            print(
                f"  {label:12s} " + "  ".join(f"{name} {seconds:.2f} s" for name, seconds in step_times.items()),
                flush=True,
            )
            if repeat > 0:  # the warm-up pays first-call allocations and AdamW's state creation
                for name, seconds in step_times.items():
                    times[name].append(seconds)
        step_time = {name: statistics.median(t) for name, t in times.items()}
        for name, seconds in step_time.items():
            print(
                f"  {name:10s} {tokens / seconds:8.0f} tokens/s   {seconds:6.3f} s/step   "
                f"{seconds / step_time['ours']:5.2f}x ours' step time"
            )
        result["tokens_per_s"] = tokens / step_time["ours"]
        if with_deepspeed:
            result["vs_deepspeed_moe"] = step_time["deepspeed"] / step_time["ours"]
        result["vs_dense"] = step_time["ours"] / step_time["dense"]
        if not args.no_layouts:
            import layouts

            print("FSDP against the replicated layout, 2 gloo ranks of one thread each:", flush=True)
            result.update(layouts.compare(config, world_size=2, repeats=args.repeats))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    print(
        "RESULT "
        + " ".join(
            f"{key}={value:.0f}" if key.endswith("tokens_per_s") else f"{key}={value:.3f}"
            for key, value in result.items()
        )
    )


if __name__ == "__main__":
    sys.exit(main())
