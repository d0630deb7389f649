"""Forward+backward throughput and peak memory of one MoE layer on one process, against its peers.

    python benchmarks/moe_layer.py [--repeats 5] [--threads 2] [--workloads coarse,fine]

Candidates, timed in the same run and interleaved (every repeat times each once, so drift in the
machine's speed hits all of them alike; the median repeat is reported):
  ours           mymoe MoELayer, dropless
  ours_cap1.25   mymoe MoELayer, capacity factor 1.25
  deepspeed      deepspeed.moe.layer.MoE, ep_size=1, drop_tokens=False
  ds_cap1.25     deepspeed.moe.layer.MoE, capacity factor 1.25
  naive          every expert on every token, weighted by the (mostly zero) combine weights
  floor          the same GEMM work as one dense SwiGLU over tokens x k rows: the compute floor
Peak memory of one forward+backward comes from torch.profiler's memory timeline (every tensor alive,
parameters and gradients included). The last line reads
RESULT coarse_vs_floor=... coarse_vs_deepspeed=... fine_vs_floor=... fine_vs_deepspeed=... fine_mem_vs_deepspeed=...
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
from torch import nn

from mymoe.config import MoEConfig
from mymoe.model.layers import SwiGLU
from mymoe.model.moe.layer import MoELayer
from peers import init_deepspeed, require_launch

WORKLOADS = {
    "coarse": dict(tokens=4096, hidden=512, ffn=1024, experts=8, top_k=2),
    "fine": dict(tokens=4096, hidden=512, ffn=256, experts=64, top_k=6),
}


def ours(w, capacity_factor=None):
    moe = MoEConfig(
        n_routed_experts=w["experts"],
        num_experts_per_tok=w["top_k"],
        moe_intermediate_size=w["ffn"],
        capacity_factor=capacity_factor,
        min_capacity=0,
        router_aux_loss_coef=0.01,
    )
    layer = MoELayer(w["hidden"], moe).train()

    def step(x):
        out, aux = layer(x)
        (out.sum() + aux.aux_loss).backward()

    return layer, step


def deepspeed_layer(w, capacity_factor=None):
    from deepspeed.moe.layer import MoE

    drop = capacity_factor is not None
    layer = MoE(
        w["hidden"],
        SwiGLU(w["hidden"], w["ffn"]),
        num_experts=w["experts"],
        ep_size=1,
        k=w["top_k"],
        capacity_factor=capacity_factor or 1.0,
        eval_capacity_factor=capacity_factor or 1.0,
        min_capacity=0,
        drop_tokens=drop,
    ).train()

    def step(x):
        out, aux, _ = layer(x.unsqueeze(0))
        (out.sum() + 0.01 * aux).backward()

    return layer, step


def naive(w):
    """The definition of an MoE with no sparsity exploited: E x the routed work."""
    router = nn.Linear(w["hidden"], w["experts"], bias=False)
    experts = nn.ModuleList(SwiGLU(w["hidden"], w["ffn"]) for _ in range(w["experts"]))

    def step(x):
        probs = router(x).softmax(-1)
        top = probs.topk(w["top_k"], dim=-1)
        weights = torch.zeros_like(probs).scatter(1, top.indices, top.values / top.values.sum(-1, keepdim=True))
        out = sum(weights[:, e : e + 1] * expert(x) for e, expert in enumerate(experts))
        out.sum().backward()

    return nn.ModuleList([router, experts]), step


def floor(w):
    dense = SwiGLU(w["hidden"], w["ffn"])

    def step(x):
        rows = x.repeat_interleave(w["top_k"], dim=0)  # [tokens * k, hidden], the rows the experts see
        dense(rows).sum().backward()

    return dense, step


def candidates(w, with_deepspeed: bool) -> dict:
    built = {"ours": ours(w), "ours_cap1.25": ours(w, 1.25)}
    if with_deepspeed:
        built["deepspeed"] = deepspeed_layer(w)
        built["ds_cap1.25"] = deepspeed_layer(w, 1.25)
    built["naive"] = naive(w)
    built["floor"] = floor(w)
    return built


def time_once(candidate, x) -> float:
    """Seconds of one forward+backward from no gradients, as a training step starts."""
    module, step = candidate
    module.zero_grad(set_to_none=True)
    x.grad = None
    start = time.perf_counter()
    step(x)
    return time.perf_counter() - start


def peak_memory_bytes(candidate, x) -> int:
    """Highest total of live tensor bytes during one forward+backward from no gradients, from the
    profiler's timeline (parameters, input and the gradients made included)."""
    from torch.profiler import ProfilerActivity, profile

    module, step = candidate
    module.zero_grad(set_to_none=True)
    x.grad = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(
            activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
        ) as prof:
            step(x)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "timeline.json")
            prof.export_memory_timeline(path, device="cpu")
            with open(path) as f:
                _, sizes = json.load(f)
    return int(max(sum(row) for row in sizes))


def main(argv=None) -> None:
    require_launch("moe_layer.py", torchrun=False)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--naive-repeats", type=int, default=2, help="the naive layer is slow; fewer repeats")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workloads", default="coarse,fine")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with_deepspeed = init_deepspeed()
    result = {}
    try:
        for name in args.workloads.split(","):
            w = WORKLOADS[name]
            torch.manual_seed(0)
            built = candidates(w, with_deepspeed)
            x = torch.randn(w["tokens"], w["hidden"], requires_grad=True)
            for candidate in built.values():  # warm-up: first-call allocations and lazy inits
                time_once(candidate, x)
            times = {key: [] for key in built}
            for repeat in range(args.repeats):
                for key, candidate in built.items():
                    if key == "naive" and repeat >= args.naive_repeats:
                        continue
                    times[key].append(time_once(candidate, x))
            tokens_per_second = {key: w["tokens"] / statistics.median(t) for key, t in times.items()}
            print(
                f"\n{name}: {w['tokens']} tokens, hidden {w['hidden']}, ffn {w['ffn']}, {w['experts']} experts, "
                f"top-{w['top_k']}, fp32, {args.threads} threads, median of {args.repeats} (naive "
                f"{args.naive_repeats})"
            )
            for key, rate in tokens_per_second.items():
                print(f"  {key:13s} {rate:10.0f} tokens/s   {rate / tokens_per_second['floor']:5.2f} of floor")
            result[f"{name}_vs_floor"] = tokens_per_second["ours"] / tokens_per_second["floor"]
            if with_deepspeed:
                result[f"{name}_vs_deepspeed"] = tokens_per_second["ours"] / tokens_per_second["deepspeed"]
                print(
                    f"  ours / deepspeed: dropless {result[f'{name}_vs_deepspeed']:.2f}x, capacity 1.25 "
                    f"{tokens_per_second['ours_cap1.25'] / tokens_per_second['ds_cap1.25']:.2f}x"
                )
                if name == "fine":
                    memory = {key: peak_memory_bytes(built[key], x) for key in ("ours", "deepspeed")}
                    print(
                        f"  peak memory of forward+backward: ours {memory['ours'] / 2**20:.0f} MiB, deepspeed "
                        f"{memory['deepspeed'] / 2**20:.0f} MiB"
                    )
                    result["fine_mem_vs_deepspeed"] = memory["ours"] / memory["deepspeed"]
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    print("RESULT " + " ".join(f"{key}={value:.3f}" for key, value in result.items()))


if __name__ == "__main__":
    sys.exit(main())
