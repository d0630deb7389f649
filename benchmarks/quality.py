"""Validation perplexity of our MoE against two dense models, at an equal number of training tokens.

    python benchmarks/quality.py [--tokens 1200000] [--models moe,dense_active,dense_total] [--set KEY=VALUE ...]

Data (benchmarks/books.py): a BPE tokenizer of the model's vocab_size (2k here) trained on six books of the
shared corpus, which are the training text; validation is the first --eval-tokens of two other authors' books, never trained on.
Models, all trained by the project's Trainer on one process with the same seed, data order, AdamW and
schedule:
  moe           8 experts, top-2, dropless, each block's FFN an MoE layer (MoEConfig defaults where the
                benchmark does not set a field)
  dense_active  dense SwiGLU of top_k * moe_intermediate_size: the parameters one token touches in the MoE
  dense_total   dense SwiGLU of n_routed_experts * moe_intermediate_size: the MoE's total parameters
--set applies dotted overrides to every model's config (e.g. --set moe.router_aux_loss_coef=0.001,
--set train.lr=1e-3); they are how the experiments behind the MoE defaults were run. Prints per model its
parameters, tokens/s and validation perplexity (MoE: also the load balance over the run), a markdown
table, and one line:
    RESULT moe_ppl=<p> dense_active_ppl=<p> dense_total_ppl=<p> moe_gain_vs_dense_active=<1 - moe/dense_active>
           moe_tokens_per_s=<t> dense_active_tokens_per_s=<t> dense_total_tokens_per_s=<t>
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from books import DEFAULT_CORPUS, prepare_books
from mymoe.config import apply_overrides, config_from_dict, validate
from mymoe.data.reader import build_train_reader
from mymoe.parallel import init_distributed
from mymoe.train.evaluation import perplexity, sum_lm_loss
from mymoe.train.loop import Trainer
from peers import require_launch

# small enough that the three models train in minutes on 2 CPU cores; the experiments behind the MoE
# defaults ran at this size. The vocabulary is 2k, not 8k: at 8k the untied embedding and LM head are 86% of
# the active parameters, the FFNs the MoE widens barely matter, and at 1M tokens the MoE lost to the
# dense model of its active size (perplexity 206.3 against 197.6); at 2k and 1.2M tokens it wins (75.8
# against 83.9, dense_total 75.0), all three models in about 4 minutes on an idle 2-core machine
SEQ_LEN = 128

BASE = {
    "model": {
        "vocab_size": 2048,
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": SEQ_LEN,
        "moe": {"n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 128},
    },
    "train": {
        "micro_batch_size": 16,
        "lr": 2e-3,
        "min_lr": 2e-4,
        "warmup_steps": 30,
        "max_steps": 10**9,  # the run ends at max_tokens
        "eval_interval": 0,
    },
    "data": {"seq_len": SEQ_LEN},
}
MODELS = ("moe", "dense_active", "dense_total")


@dataclass
class Outcome:
    name: str
    parameters: int
    active_parameters: int
    tokens: int
    tokens_per_second: float
    valid_loss: float
    balance: str  # the MoE's load over the run, "" for a dense model

    @property
    def perplexity(self) -> float:
        return perplexity(self.valid_loss)


def model_config(name: str, args, books) -> dict:
    """The raw config of one candidate: the shared base, the overrides, then what makes it dense."""
    values = apply_overrides(BASE, [f"--{item}" for item in args.set])
    values["train"].update(max_tokens=args.tokens, seed=args.seed)
    values["data"].update(train_prefixes=[books.train_prefix], valid_prefixes=[books.valid_prefix])
    values["data"]["tokenizer"] = books.tokenizer
    moe = config_from_dict(values).model.moe  # the MoE's fields as the MoE model would see them
    if name != "moe":
        experts = moe.num_experts_per_tok if name == "dense_active" else moe.n_routed_experts
        values["model"].update(
            intermediate_size=experts * moe.moe_intermediate_size,
            first_k_dense_replace=values["model"]["num_hidden_layers"],
        )
    return values


def balance_summary(loads: list) -> str:
    """Over the run: mean of the per-layer max/mean load, and the least-used expert's share of a fair load."""
    loads = torch.tensor(loads)  # [steps, layers, experts]
    mean = loads.mean(-1, keepdim=True).clamp(min=1e-9)
    max_ratio = (loads.max(-1).values / mean.squeeze(-1)).mean()
    late = loads[len(loads) // 2 :].sum(0)  # [layers, experts] over the second half
    least = (late.min(-1).values / late.mean(-1)).min()
    return f"max/mean load {float(max_ratio):.2f} (run mean), least-used expert {float(least):.2f} of a fair share"


def train_one(name: str, args, books) -> Outcome:
    config = config_from_dict(model_config(name, args, books))
    print(f"{name}: training on {args.tokens:,} tokens ...", flush=True)
    trainer = Trainer(config, init_distributed(config))
    loads = []
    start = time.perf_counter()
    while not trainer.finished():
        metrics = trainer.train_step()
        if trainer.step % 50 == 0 or trainer.finished():
            print(f"  step {trainer.step}/{trainer.total_steps}  loss {metrics['loss']:.3f}", flush=True)
        if metrics["expert_loads"]:
            loads.append(metrics["expert_loads"])
    seconds = time.perf_counter() - start
    seq_len, batch_size = config.data.seq_len, config.train.micro_batch_size
    valid = build_train_reader([books.valid_prefix], None, seq_len=seq_len, micro_batch_size=batch_size, shuffle=False)
    batches = (valid.next_batch() for _ in range(max(1, args.eval_tokens // (seq_len * batch_size))))
    summed = sum_lm_loss(trainer.model, batches, config, torch.device("cpu"))
    model = trainer.model
    return Outcome(
        name,
        model.num_parameters(),
        model.num_parameters(active_only=True),
        trainer.tokens_seen,
        trainer.tokens_seen / seconds,
        summed.loss,
        balance_summary(loads) if loads else "",
    )


def main() -> None:
    require_launch("quality.py", torchrun=False)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_200_000, help="training tokens of every model")
    parser.add_argument("--eval-tokens", type=int, default=131_072, help="held-out tokens scored")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "mymoe-bench-data")
    args = parser.parse_args()
    names = args.models.split(",")
    unknown = [name for name in names if name not in MODELS]
    if unknown:
        parser.error(f"--models: {', '.join(unknown)} unknown; choose from {', '.join(MODELS)}")
    # the tokenizer is trained at the model's vocabulary size, so `--set model.vocab_size=N` changes both
    vocab_size = apply_overrides(BASE, [f"--{item}" for item in args.set])["model"]["vocab_size"]
    books = prepare_books(args.corpus, args.data_dir, vocab_size=vocab_size)
    for name in names:  # every config checked before any training
        validate(config_from_dict(model_config(name, args, books)))
    torch.set_num_threads(args.threads)
    overrides = f", overrides {' '.join(args.set)}" if args.set else ""
    shape = config_from_dict(model_config("moe", args, books))
    print(
        f"validation perplexity at {args.tokens:,} training tokens (seq {shape.data.seq_len}, batch "
        f"{shape.train.micro_batch_size}), "
        f"{args.eval_tokens:,} held-out tokens, {args.threads} threads{overrides}"
    )
    outcomes = {}
    for name in names:
        outcome = outcomes[name] = train_one(name, args, books)
        print(
            f"  {name}: {outcome.parameters / 1e6:.2f}M parameters ({outcome.active_parameters / 1e6:.2f}M active), "
            f"{outcome.tokens_per_second:,.0f} tokens/s, valid loss {outcome.valid_loss:.4f}, perplexity "
            f"{outcome.perplexity:.1f}" + (f"; {outcome.balance}" if outcome.balance else ""),
            flush=True,
        )

    print("\n| model | parameters | active | tokens/s | valid perplexity |\n| --- | ---: | ---: | ---: | ---: |")
    for outcome in outcomes.values():
        print(
            f"| {outcome.name} | {outcome.parameters / 1e6:.2f}M | {outcome.active_parameters / 1e6:.2f}M | "
            f"{outcome.tokens_per_second:,.0f} | {outcome.perplexity:.1f} |"
        )
    fields = [f"{name}_ppl={outcome.perplexity:.1f}" for name, outcome in outcomes.items()]
    if "moe" in outcomes and "dense_active" in outcomes:
        gain = 1 - outcomes["moe"].perplexity / outcomes["dense_active"].perplexity
        fields.append(f"moe_gain_vs_dense_active={gain:.3f}")
    fields += [f"{name}_tokens_per_s={outcome.tokens_per_second:.0f}" for name, outcome in outcomes.items()]
    print("RESULT " + " ".join(fields))


if __name__ == "__main__":
    main()
