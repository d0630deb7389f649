"""What each `mymoe-convert` subcommand does (cli.py parses the arguments)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from mymoe.checkpoint.storage import CheckpointError
from mymoe.config import ConfigError, load_config, validate
from mymoe.convert.consolidate import consolidate, save_weights
from mymoe.convert.hf import export_hf, import_hf
from mymoe.convert.megatron_names import export_megatron
from mymoe.convert.reshard import write_sharded
from mymoe.load import load_model
from mymoe.upcycle import upcycle, upcycled_config

KNOWN_ERRORS = (CheckpointError, ConfigError, OSError)  # printed as one line, exit 1


def run(args: argparse.Namespace) -> str:
    """Do the conversion; return the one-line summary."""
    if args.command == "consolidate":
        print(
            f"consolidating {args.checkpoint} into {args.out}"
            f"{' (weights only)' if args.weights_only else ' (weights and training state)'}",
            file=sys.stderr,
        )
        done = consolidate(args.checkpoint, args.out, args.step, args.weights_only, args.overwrite)
        return (
            f"wrote {args.out} ({done['tensors']} tensors, {done['bytes'] / 2**20:.1f} MiB, step {done['step']}) "
            f"and {done['config_file']}"
        )
    if args.command in ("to-sharded", "reshard"):
        run_config = load_config(args.config) if args.config else None
        print(
            f"writing {args.source} as a checkpoint of {args.world_size} rank(s) at expert-parallel size "
            f"{args.expert_parallel_size} into {args.out}",
            file=sys.stderr,
        )
        done = write_sharded(
            args.source, args.out, args.world_size, args.expert_parallel_size, args.step, run_config, args.overwrite
        )
        return (
            f"wrote step {done['step']} to {done['out_root']} ({done['files']} shard files, world size "
            f"{done['world_size']}, EP {done['expert_parallel_size']}); resume with train.out_dir set to its "
            f"parent folder"
        )
    if args.command == "export-hf":
        model, _, _ = load_model(args.source, args.step)
        print(f"exporting {args.source} to Hugging Face format '{args.format}' in {args.out}", file=sys.stderr)
        done = export_hf(model, args.out, args.format, args.tokenizer, args.overwrite)
        return f"wrote {done['architecture']} to {args.out} ({done['tensors']} tensors)"
    if args.command == "import-hf":
        print(f"importing the Hugging Face model in {args.source} into {args.out}", file=sys.stderr)
        done = import_hf(args.source, args.out, args.overwrite)
        return f"wrote {args.out} from {done['architecture']} ({done['tensors']} tensors, weights only)"
    if args.command == "upcycle":
        print(
            f"upcycling {args.source} into {args.experts} experts (top-{args.top_k}) per MoE layer, writing {args.out}",
            file=sys.stderr,
        )
        done = upcycle_checkpoint(
            args.source,
            args.out,
            args.experts,
            args.top_k,
            args.first_k_dense_replace,
            args.noise_std,
            args.router_init_std,
            args.seed,
            args.overwrite,
        )
        if not done["same_function"]:
            print(
                "note: with these settings the MoE does not compute the dense model's logits at the start (that "
                "needs top-k > 1, norm_topk_prob, routed_scaling_factor 1, noise_std 0 and no capacity limit)",
                file=sys.stderr,
            )
        return (
            f"wrote {args.out} ({done['tensors']} tensors, {done['moe_layers']} MoE layers of {args.experts} "
            f"experts) and its .yaml config; fine-tune with --train.init_from {args.out}"
        )
    if args.command == "export-megatron":
        model, _, _ = load_model(args.source, args.step)
        print(f"writing {args.source} under Megatron-Core names to {args.out}", file=sys.stderr)
        done = export_megatron(model, args.out, args.overwrite)
        return f"wrote {args.out} ({done['tensors']} tensors under Megatron-Core names)"
    raise AssertionError(args.command)


def upcycle_checkpoint(
    source,
    out_file,
    experts: int,
    top_k: int,
    first_k_dense_replace: int = 0,
    noise_std: float = 0.0,
    router_init_std: float = 0.02,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """A dense model (Hugging Face folder such as a Llama or Qwen3, consolidated file or checkpoints folder)
    -> a weights-only MoE file with its YAML config beside it, ready for ``--train.init_from``.

    The other MoE fields keep the source config's moe section (softmax, norm_topk_prob true, dropless by
    default). The logits equal the dense model's when the chosen weights sum to one (top_k > 1 with
    norm_topk_prob and routed_scaling_factor 1), noise_std is 0 and no token is dropped.
    """
    dense, config, _ = load_model(source)
    layers = config.model.num_hidden_layers
    if config.model.first_k_dense_replace != layers:
        raise CheckpointError(
            f"{source} is already an MoE model ({layers - config.model.first_k_dense_replace} of "
            f"{layers} layers MoE): upcycling starts from a dense one (a Llama or Qwen3 folder, "
            f"or a model of ours with first_k_dense_replace = num_hidden_layers)"
        )
    moe = dataclasses.replace(config.model.moe, n_routed_experts=experts, num_experts_per_tok=top_k)
    config = validate(dataclasses.replace(config, model=upcycled_config(config.model, moe, first_k_dense_replace)))
    model = upcycle(
        dense,
        config.model.moe,
        first_k_dense_replace=first_k_dense_replace,
        noise_std=noise_std,
        router_init_std=router_init_std,
        seed=seed,
    )
    moe = config.model.moe
    same_function = (
        moe.norm_topk_prob and top_k > 1 and moe.routed_scaling_factor == 1.0 and noise_std == 0 and moe.dropless
    )
    count = save_weights(model, config, out_file, overwrite, upcycled_from=str(source))
    return {"tensors": count, "same_function": same_function, "moe_layers": layers - first_k_dense_replace}
