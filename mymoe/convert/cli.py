"""`mymoe-convert` / `python -m mymoe.convert`: one subcommand per conversion (see the package docstring).

Only the argument parser lives here, so `--help` and a mistyped flag answer at once; the conversions
(commands.py) import torch and safetensors.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace the output if it exists")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mymoe-convert",
        description="Convert mymoe checkpoints: consolidate, "
        "reshard, Hugging Face export and import, Megatron-Core names.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("consolidate", help="sharded checkpoint -> one .safetensors file + .yaml config")
    p.add_argument("checkpoint", help="a run's checkpoints folder (its latest step) or one step_* folder")
    p.add_argument("out", help="the .safetensors file to write")
    p.add_argument("--step", type=int, default=None)
    p.add_argument(
        "--weights-only",
        "--weights_only",
        action="store_true",
        help="leave out optimizer state, step, reader position and RNG (cannot be resumed)",
    )
    _add_common(p)

    for name, help_text in (
        ("to-sharded", "consolidated .safetensors -> sharded checkpoint a run resumes from"),
        ("reshard", "sharded checkpoint -> sharded checkpoint at another layout"),
    ):
        p = commands.add_parser(name, help=help_text)
        p.add_argument(
            "source",
            help="a .safetensors file written by consolidate"
            if name == "to-sharded"
            else "a run's checkpoints folder or one step_* folder",
        )
        p.add_argument("out", help="the checkpoints folder to create (step_* and latest inside)")
        p.add_argument("--world-size", "--world_size", type=int, default=1, help="ranks the checkpoint is written by")
        p.add_argument("--expert-parallel-size", "--expert_parallel_size", type=int, default=1)
        p.add_argument("--step", type=int, default=None)
        p.add_argument(
            "--config",
            default=None,
            help="the YAML config of the run that will resume (default: "
            "the source's); its architecture must match the source",
        )
        _add_common(p)

    p = commands.add_parser("export-hf", help="checkpoint or consolidated file -> Hugging Face folder")
    p.add_argument("source", help="a checkpoints folder, step_* folder or consolidated .safetensors file")
    p.add_argument("out", help="the folder to create (config.json + model.safetensors)")
    p.add_argument(
        "--format",
        choices=(
            "auto",
            "mixtral",
            "qwen2_moe",
            "qwen3_moe",
            "olmoe",
            "deepseek_v2",
            "deepseek_v3",
            "granitemoe",
            "gpt_oss",
            "llama",
            "qwen3",
        ),
        default="auto",
        help="auto picks the one whose routing matches the config",
    )
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
    p.add_argument(
        "--noise_std",
        type=float,
        default=0.0,
        help="per-expert noise (in standard deviations of each weight); 0 keeps the dense logits",
    )
    p.add_argument("--router_init_std", type=float, default=0.02, help="std of the new routers' weights")
    p.add_argument("--seed", type=int, default=0)
    _add_common(p)

    p = commands.add_parser("export-megatron", help="model weights under Megatron-Core GPT MoE names")
    p.add_argument("source", help="a checkpoints folder, step_* folder or consolidated .safetensors file")
    p.add_argument("out", help="the .safetensors file to write")
    p.add_argument("--step", type=int, default=None)
    _add_common(p)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    # the conversions import torch (seconds): loaded only once the arguments are known to be good
    from mymoe.convert import commands

    start = time.perf_counter()
    try:
        summary = commands.run(args)
    except commands.KNOWN_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{summary} in {time.perf_counter() - start:.1f} s")
    return 0
