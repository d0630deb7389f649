"""Generate text, or map vectors, from a trained model in one process: the inference command of SimpleMoE.

    python -m mymoe.generate --model-path runs/x/checkpoints --vocab-path tok.model --prompt "Once upon a time"
    python -m mymoe.generate --model_type long_transformer_moe --model_path model.pt --prompt "A long essay:"
    python -m mymoe.generate --model_type simple_moe --model_path vectors.pt --input_file rows.npy

--model-type picks what runs:
    transformer_moe       the text model (default): the prompt follows an end-of-document token, as every
                          training document does, and tokens are printed as they are sampled (KV cache)
    long_transformer_moe  the text model with its context extended at inference (--rope-scaling, default
                          yarn:8 unless the model has its own; dynamic:8 for dynamic NTK); the context
                          length is printed
    simple_moe            the vector model (mymoe.model.vector.VectorMoE): rows from --input-file (.npy or
                          .csv, "" reads CSV rows on stdin), output rows to --output-file (.npy, .csv, "": stdout)

--model-path (default ./checkpoints/model.pt, as SimpleMoE's) takes a run's checkpoints folder (any EP
layout), a consolidated .safetensors file (mymoe-convert consolidate), a Hugging Face folder or a .pt
state dict, read with torch.load(weights_only=True) so that a file cannot run code while it loads.
--vocab-path takes a sentencepiece .model or a tokenizer.json. --input-file for the text models holds one
prompt per line, generated as one left-padded batch; "" (the default) means none.

This module is only the argument parser, so --help and a mistyped flag answer at once; the work
(mymoe/inference.py) imports torch once the arguments are known to be good.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from mymoe.config import ConfigError, validate_rope_scaling

MODEL_TYPES = ("transformer_moe", "long_transformer_moe", "simple_moe")
DEFAULT_MODEL_PATH = "./checkpoints/model.pt"  # SimpleMoE's documented default
DEFAULT_VOCAB_PATH = "./data/tokenizer.json"  # used when the model names no tokenizer, as in SimpleMoE
LONG_CONTEXT_FACTOR = 8.0  # SimpleMoE's long-context scaling_factor: `yarn` alone means yarn:8


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, except where there is none to show (None, or an off switch)."""

    def _get_help_string(self, action):
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mymoe-generate", description=__doc__.split("\n\n")[0], formatter_class=_DefaultsHelp
    )
    parser.add_argument(
        "--model-type",
        "--model_type",
        choices=MODEL_TYPES,
        default="transformer_moe",
        help="the text model, the text model with an extended context, or the vector model",
    )
    parser.add_argument(
        "--model-path",
        "--model_path",
        default=None,
        help=f"a checkpoints folder, consolidated .safetensors file, Hugging Face folder or .pt "
        f"state dict; when neither this nor --checkpoint is given: {DEFAULT_MODEL_PATH}",
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="instead of --model-path: a run's checkpoints folder (its `latest`) or one step_* folder",
    )
    parser.add_argument("--step", type=int, default=None, help="load this step instead of the latest")
    parser.add_argument(
        "--vocab-path",
        "--vocab_path",
        default=None,
        help=f"sentencepiece .model or tokenizer.json; when not given: data.tokenizer from the "
        f"model's config, else {DEFAULT_VOCAB_PATH}",
    )
    parser.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    parser.add_argument(
        "--input-file",
        "--input_file",
        default="",
        help="text: one prompt per line, as one batch; simple_moe: .npy or .csv rows ('' reads stdin); '' means none",
    )
    parser.add_argument(
        "--output-file",
        "--output_file",
        default="",
        help="simple_moe: .npy or .csv to write the output rows to ('' prints CSV)",
    )
    parser.add_argument(
        "--rope-scaling",
        "--rope_scaling",
        default=None,
        help="yarn:FACTOR, dynamic:FACTOR, linear:FACTOR or JSON (long_transformer_moe: yarn:8)",
    )
    parser.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 is greedy")
    parser.add_argument("--top-k", "--top_k", type=int, default=50, help="0 disables")
    parser.add_argument("--top-p", "--top_p", type=float, default=0.9, help="1 disables")
    parser.add_argument("--repetition-penalty", "--repetition_penalty", type=float, default=1.1, help="1 disables")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    parser.add_argument("--no-stream", "--no_stream", action="store_true", help="print the text once, at the end")
    parser.add_argument(
        "--speculative",
        action="store_true",
        help="greedy decoding (no sampling, no repetition penalty) drafted by the model's "
        "multi-token prediction head and verified by its main head: the plain greedy "
        "output, in fewer main-model steps",
    )
    parser.add_argument(
        "--strategy",
        choices=("sample", "dual_head"),
        default="sample",
        help="sample: the main head with the flags above; dual_head (a model with candidate_head): greedy, the "
        "main head's token when its probability after --repetition-penalty is >= --confidence-threshold, "
        "else the candidate head's",
    )
    parser.add_argument(
        "--confidence-threshold",
        "--confidence_threshold",
        type=float,
        default=0.5,
        help="dual_head: 0 always takes the main head, above 1 always the candidate head",
    )
    parser.set_defaults(fallback_vocab_path=DEFAULT_VOCAB_PATH, long_context_preset=None)
    args = parser.parse_args(argv)
    if args.checkpoint is not None and args.model_path is not None:
        parser.error("give one of --checkpoint or --model-path")
    if args.checkpoint is None and args.model_path is None:
        args.model_path = DEFAULT_MODEL_PATH
    if args.model_type == "simple_moe" and (args.checkpoint is not None or args.rope_scaling or args.speculative):
        parser.error(
            "--model-type simple_moe reads a vector model from --model-path (a .pt file); --checkpoint, "
            "--rope-scaling and --speculative are for the text models"
        )
    if args.model_type == "long_transformer_moe" and args.rope_scaling is None:
        args.long_context_preset = parse_rope_scaling("yarn")  # unless the model was trained with a scaling
    if args.rope_scaling is not None:
        try:
            args.rope_scaling = parse_rope_scaling(args.rope_scaling)
        except ValueError as error:
            parser.error(str(error))
    if args.strategy == "dual_head" and args.speculative:
        parser.error("--strategy dual_head and --speculative are two decoding loops: give one")
    if args.confidence_threshold < 0:
        parser.error(f"--confidence-threshold={args.confidence_threshold} must be >= 0 (a probability; 0: main head)")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1 or args.repetition_penalty <= 0:
        parser.error(
            f"--temperature={args.temperature} and --top-k={args.top_k} must be >= 0, "
            f"--top-p={args.top_p} in (0, 1], --repetition-penalty={args.repetition_penalty} > 0"
        )
    return args


def parse_rope_scaling(spec: str) -> dict:
    """`yarn:4`, `yarn` (factor 8, the long-context preset) or `{"type": "yarn", "factor": 4, ...}` -> a
    rope_scaling mapping, checked like the config's."""
    try:
        if spec.strip().startswith("{"):
            scaling = json.loads(spec)
        else:
            kind, _, factor = spec.partition(":")
            scaling = {"type": kind, "factor": float(factor) if factor else LONG_CONTEXT_FACTOR}
        validate_rope_scaling(scaling)
    except (ValueError, ConfigError) as error:
        raise ValueError(
            f'--rope-scaling={spec!r}: {error} (write e.g. yarn:4 or \'{{"type": "yarn", "factor": 4}}\')'
        ) from None
    return scaling


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    source = args.checkpoint or args.model_path
    if not os.path.exists(source):
        flag = "--checkpoint" if args.checkpoint else "--model-path"
        default = " (the default)" if source == DEFAULT_MODEL_PATH else ""
        print(
            f"error: {flag} {source}{default} does not exist: give a run's checkpoints folder, a consolidated "
            f".safetensors file, a Hugging Face folder or a .pt state dict",
            file=sys.stderr,
        )
        return 1
    # the work imports torch (seconds): loaded only once the arguments are known to be good
    from mymoe import inference

    return inference.run(args)


if __name__ == "__main__":
    sys.exit(main())
