"""train.compile against eager: one-process training step time of the same model, compiled and not.

    python benchmarks/compile.py [--repeats 20] [--threads 1]

A step is zero the gradients, forward with the loss, backward, AdamW step. Both models start from the
same weights; the compiled one is compiled as train.compile does (mymoe/train/compile.py). The first
compiled step (the compilation) is timed apart, then a few warm steps of each, then the repeats
interleave the two so that drift in the machine's speed hits both alike; the median counts. Two model
sizes: "tiny" (the tests' config) and "small". The last line reads
    RESULT tiny_compile_speedup=<eager / compiled step time> small_compile_speedup=<...>
           tiny_compile_seconds=<first compiled step> small_compile_seconds=<...>
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from mymoe.config import ModelConfig, MoEConfig, TrainConfig
from mymoe.model.transformer import MoECausalLM
from mymoe.optim import build_optimizer, parameter_groups
from mymoe.train.compile import compile_blocks
from peers import require_launch

SIZES = {
    # name: (hidden, attention heads, kv heads, layers, experts, expert ffn, batch, seq)
    "tiny": (32, 2, 1, 2, 4, 32, 8, 64),
    "small": (256, 4, 2, 2, 8, 512, 4, 256),
}
VOCAB = 512


def build(size: str) -> tuple[MoECausalLM, torch.Tensor]:
    hidden, heads, kv_heads, layers, experts, ffn, batch, seq = SIZES[size]
    moe = MoEConfig(n_routed_experts=experts, num_experts_per_tok=2, moe_intermediate_size=ffn)
    config = ModelConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=seq,
        moe=moe,
    )
    torch.manual_seed(0)
    return MoECausalLM(config), torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def make_step(model: MoECausalLM, ids: torch.Tensor):
    optimizer = build_optimizer(parameter_groups(model, 0.1), TrainConfig())

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


def main() -> None:
    require_launch("compile.py", torchrun=False)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed steps of each model per size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each after compilation")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"training step, eager vs train.compile, {args.threads} thread(s), {args.repeats} interleaved repeats")
    speedups, compile_seconds = {}, {}
    for size in SIZES:
        eager, ids = build(size)
        compiled = copy.deepcopy(eager)
        compile_blocks(compiled)
        eager_step, compiled_step = make_step(eager, ids), make_step(compiled, ids)
        compile_seconds[size] = compiled_step()
        for _ in range(args.warmup):
            eager_step(), compiled_step()
        eager_times, compiled_times = [], []
        for _ in range(args.repeats):
            eager_times.append(eager_step())
            compiled_times.append(compiled_step())
        eager_median, compiled_median = statistics.median(eager_times), statistics.median(compiled_times)
        speedups[size] = eager_median / compiled_median
        print(
            f"  {size:5s} eager {eager_median * 1e3:7.1f} ms/step   compiled {compiled_median * 1e3:7.1f} ms/step   "
            f"speed-up {speedups[size]:.2f}x   (compilation: first step {compile_seconds[size]:.1f} s)"
        )
    print(
        "RESULT "
        + " ".join(f"{size}_compile_speedup={speedups[size]:.2f}" for size in SIZES)
        + " "
        + " ".join(f"{size}_compile_seconds={compile_seconds[size]:.1f}" for size in SIZES)
    )


if __name__ == "__main__":
    main()
