"""`mymoe-convert` / `python -m mymoe.convert`: one subcommand per conversion (see the package docstring)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

from mymoe.checkpoint.storage import CheckpointError
from mymoe.config import ConfigError, load_config


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace the output if it exists")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mymoe-convert", description="Convert mymoe checkpoints: consolidate, "
                                     "reshard, Hugging Face export and import, Megatron-Core names.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("consolidate", help="sharded checkpoint -> one .safetensors file + .yaml config")
    p.add_argument("checkpoint", help="a run's checkpoints folder (its latest step) or one step_* folder")
    p.add_argument("out", help="the .safetensors file to write")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--weights_only", action="store_true",
                   help="leave out optimizer state, step, reader position and RNG (cannot be resumed)")
    _add_common(p)

    for name, help_text in (("to-sharded", "consolidated .safetensors -> sharded checkpoint a run resumes from"),
                            ("reshard", "sharded checkpoint -> sharded checkpoint at another layout")):
        p = commands.add_parser(name, help=help_text)
        p.add_argument("source", help="a .safetensors file written by consolidate" if name == "to-sharded"
                       else "a run's checkpoints folder or one step_* folder")
        p.add_argument("out", help="the checkpoints folder to create (step_* and latest inside)")
        p.add_argument("--world_size", type=int, default=1, help="ranks the checkpoint is written by")
        p.add_argument("--expert_parallel_size", type=int, default=1)
        p.add_argument("--step", type=int, default=None)
        p.add_argument("--config", default=None, help="the YAML config of the run that will resume (default: "
                       "the source's); its architecture must match the source")
        _add_common(p)

    p = commands.add_parser("export-hf", help="checkpoint or consolidated file -> Hugging Face folder")
    p.add_argument("source", help="a checkpoints folder, step_* folder or consolidated .safetensors file")
    p.add_argument("out", help="the folder to create (config.json + model.safetensors)")
    p.add_argument("--format", choices=("auto", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2",
                                        "deepseek_v3", "granitemoe", "gpt_oss", "llama", "qwen3"),
                   default="auto",
                   help="auto picks the one whose routing matches the config")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model to copy into the export")
    _add_common(p)

    p = commands.add_parser("import-hf", help="Hugging Face folder -> consolidated .safetensors (weights only)")
    p.add_argument("source", help="a folder with config.json and *.safetensors (Mixtral, Qwen2-MoE)")
    p.add_argument("out", help="the .safetensors file to write")
    _add_common(p)

    p = commands.add_parser("upcycle", help="dense model -> MoE whose experts start as copies of its MLPs")
    p.add_argument("source", help="a dense Hugging Face folder (Llama, Qwen3), consolidated file or checkpoints folder")
    p.add_argument("out", help="the .safetensors file to write (its .yaml config beside it), for --train.init_from")
    p.add_argument("--experts", type=int, required=True, help="routed experts per MoE layer")
    p.add_argument("--top-k", "--top_k", dest="top_k", type=int, required=True, help="experts chosen per token")
    p.add_argument("--first_k_dense_replace", type=int, default=0, help="leading layers that stay dense")
    p.add_argument("--noise_std", type=float, default=0.0,
                   help="per-expert noise (in standard deviations of each weight); 0 keeps the dense logits")
    p.add_argument("--router_init_std", type=float, default=0.02, help="std of the new routers' weights")
    p.add_argument("--seed", type=int, default=0)
    _add_common(p)

    p = commands.add_parser("export-megatron", help="model weights under Megatron-Core GPT MoE names")
    p.add_argument("source", help="a checkpoints folder, step_* folder or consolidated .safetensors file")
    p.add_argument("out", help="the .safetensors file to write")
    p.add_argument("--step", type=int, default=None)
    _add_common(p)
    return parser.parse_args(argv)


def load_any_model(source: str, step: Optional[int] = None):
    """(model with every expert, config) from a checkpoints folder, step folder or consolidated file."""
    from mymoe.convert.consolidate import find_checkpoint, load_consolidated_model

    path = Path(source)
    if path.is_file():
        return load_consolidated_model(path)
    from mymoe.checkpoint import load_model

    directory, _ = find_checkpoint(path, step)
    model, config, _ = load_model(directory, verify=False)
    return model, config


def run(args: argparse.Namespace) -> str:
    """Do the conversion; return the one-line summary."""
    if args.command == "consolidate":
        from mymoe.convert.consolidate import consolidate

        print(f"consolidating {args.checkpoint} into {args.out}"
              f"{' (weights only)' if args.weights_only else ' (weights and training state)'}", file=sys.stderr)
        done = consolidate(args.checkpoint, args.out, args.step, args.weights_only, args.overwrite)
        return (f"wrote {args.out} ({done['tensors']} tensors, {done['bytes'] / 2**20:.1f} MiB, step {done['step']}) "
                f"and {done['config_file']}")
    if args.command in ("to-sharded", "reshard"):
        from mymoe.convert.reshard import write_sharded

        run_config = load_config(args.config) if args.config else None
        print(f"writing {args.source} as a checkpoint of {args.world_size} rank(s) at expert-parallel size "
              f"{args.expert_parallel_size} into {args.out}", file=sys.stderr)
        done = write_sharded(args.source, args.out, args.world_size, args.expert_parallel_size, args.step,
                             run_config, args.overwrite)
        return (f"wrote step {done['step']} to {done['out_root']} ({done['files']} shard files, world size "
                f"{done['world_size']}, EP {done['expert_parallel_size']}); resume with train.out_dir set to its "
                f"parent folder")
    if args.command == "export-hf":
        from mymoe.convert.hf import export_hf

        model, config = load_any_model(args.source, args.step)
        print(f"exporting {args.source} to Hugging Face format '{args.format}' in {args.out}", file=sys.stderr)
        done = export_hf(model, args.out, args.format, args.tokenizer, args.overwrite)
        return f"wrote {done['architecture']} to {args.out} ({done['tensors']} tensors)"
    if args.command == "import-hf":
        from mymoe.convert.hf import import_hf

        print(f"importing the Hugging Face model in {args.source} into {args.out}", file=sys.stderr)
        done = import_hf(args.source, args.out, args.overwrite)
        return f"wrote {args.out} from {done['architecture']} ({done['tensors']} tensors, weights only)"
    if args.command == "upcycle":
        from mymoe.upcycle import upcycle_checkpoint

        print(f"upcycling {args.source} into {args.experts} experts (top-{args.top_k}) per MoE layer, writing "
              f"{args.out}", file=sys.stderr)
        done = upcycle_checkpoint(args.source, args.out, args.experts, args.top_k, args.first_k_dense_replace,
                                  args.noise_std, args.router_init_std, args.seed, args.overwrite)
        if not done["same_function"]:
            print("note: with these settings the MoE does not compute the dense model's logits at the start (that "
                  "needs top-k > 1, norm_topk_prob, routed_scaling_factor 1, noise_std 0 and no capacity limit)",
                  file=sys.stderr)
        return (f"wrote {args.out} ({done['tensors']} tensors, {done['moe_layers']} MoE layers of {args.experts} "
                f"experts) and its .yaml config; fine-tune with --train.init_from {args.out}")
    if args.command == "export-megatron":
        from mymoe.convert.megatron_names import export_megatron

        model, config = load_any_model(args.source, args.step)
        print(f"writing {args.source} under Megatron-Core names to {args.out}", file=sys.stderr)
        done = export_megatron(model, args.out, args.overwrite)
        return f"wrote {args.out} ({done['tensors']} tensors under Megatron-Core names)"
    raise AssertionError(args.command)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        summary = run(args)
    except (CheckpointError, ConfigError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{summary} in {time.perf_counter() - start:.1f} s")
    return 0
