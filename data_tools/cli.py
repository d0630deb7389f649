"""Argument parsing for `python -m data_tools` (also installed as `mymoe-data`).

Each command checks its settings, prints what it will do, shows progress bars on stderr while it
works and ends with a one-line summary of what it wrote and where. Bad input or settings end the
run with `error: ...` and exit status 2; an interrupted run exits 130 and leaves no output pair.
"""

import argparse
import os
import sys

from data_tools import DataError, count_of
from data_tools.corpus import resolve_inputs
from data_tools.inspect_dataset import inspect_dataset
from data_tools.merge import merge
from data_tools.preprocess import PreprocessOptions, preprocess
from data_tools.hf_bpe import check_bpe_options, train_bpe
from data_tools.tokenizer import TokenizerOptions, check_tokenizer_options, train_tokenizer

INPUT_HELP = (
    "files, directories (searched recursively) or glob patterns of .txt, .txt.gz, .jsonl, "
    ".jsonl.gz; or builtin:stdlib (about 4 MB of the local Python standard library, offline) "
    "or builtin:stdlib-full (all of it); several may follow one --input"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools",
        description="Train a tokenizer, turn text into Megatron .bin/.idx files, inspect them.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tok = commands.add_parser("train-tokenizer", help="train a SentencePiece (or Hugging Face BPE) tokenizer")
    _add_input_arguments(tok)
    tok.add_argument(
        "--output",
        required=True,
        help="prefix: writes OUTPUT.model and OUTPUT.vocab (--library tokenizers: the folder "
        "OUTPUT/ with tokenizer.json and tokenizer_config.json)",
    )
    tok.add_argument(
        "--library",
        default="sentencepiece",
        choices=["sentencepiece", "tokenizers"],
        help="tokenizers: a byte-level BPE trained with Hugging Face tokenizers",
    )
    tok.add_argument("--vocab-size", type=int, default=8000)
    tok.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    tok.add_argument(
        "--normalization",
        default="identity",
        choices=["identity", "nmt_nfkc"],
        help="identity keeps text and whitespace as they are (code survives a round "
        "trip); nmt_nfkc is SentencePiece's default for prose",
    )
    tok.add_argument(
        "--no-byte-fallback",
        dest="byte_fallback",
        action="store_false",
        help="map unknown characters to <unk> instead of their UTF-8 bytes",
    )
    tok.add_argument(
        "--special-tokens",
        nargs="*",
        default=[],
        metavar="TOKEN",
        help="pieces kept whole, with ids from 3 up (e.g. '<|user|>' '<|tool|>')",
    )
    tok.add_argument("--character-coverage", type=float, default=0.9995)
    tok.add_argument(
        "--input-sentence-size",
        type=int,
        default=0,
        metavar="LINES",
        help="train on a uniform sample of this many lines (0 = all); caps the memory of training on a huge corpus",
    )
    tok.add_argument("--num-threads", type=int, default=os.cpu_count() or 1)
    tok.add_argument("--seed", type=int, default=1234)

    pre = commands.add_parser("preprocess", help="tokenize documents into .bin/.idx")
    _add_input_arguments(pre)
    pre.add_argument(
        "--tokenizer", required=True, help="a SentencePiece .model, a tokenizer.json, or a Hugging Face model folder"
    )
    pre.add_argument(
        "--output",
        required=True,
        help="prefix: writes OUTPUT.{bin,idx}, or OUTPUT_train and OUTPUT_valid with --split / --valid-docs",
    )
    pre.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    split = pre.add_mutually_exclusive_group()
    split.add_argument(
        "--split",
        type=float,
        help="fraction of documents for training, e.g. 0.99; the rest, evenly spread, go to OUTPUT_valid",
    )
    split.add_argument("--valid-docs", type=int, help="exact number of validation documents")
    pre.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "uint16", "int32"],
        help="token dtype in .bin (auto: uint16 below 65,500 pieces, as Megatron)",
    )
    pre.add_argument(
        "--mpi", action="store_true", help="run under mpiexec: each rank tokenizes a share of the files, rank 0 merges"
    )

    merge = commands.add_parser("merge", help="append .bin/.idx pairs into one")
    merge.add_argument("shards", nargs="+", help="prefixes (or .bin/.idx paths, or globs)")
    merge.add_argument("--output", required=True, help="prefix of the merged pair")
    merge.add_argument("--overwrite", action="store_true")
    merge.add_argument("--quiet", action="store_true", help="no progress bars")

    look = commands.add_parser("inspect", help="counts, length histogram, decoded samples")
    look.add_argument("prefix", help="a .bin/.idx prefix (or either file)")
    look.add_argument(
        "--tokenizer", help="decode samples and check ids with this tokenizer (.model, tokenizer.json or model folder)"
    )
    look.add_argument("--samples", type=int, default=2, help="documents to decode")
    look.add_argument("--max-chars", type=int, default=400, help="characters shown per sample")
    look.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _add_input_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", action="extend", nargs="+", required=True, help=INPUT_HELP)
    parser.add_argument("--json-key", default="text", help="field holding the text in .jsonl")
    parser.add_argument(
        "--txt-unit", default="file", choices=["file", "paragraph", "line"], help="what one document is in a .txt file"
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first malformed JSON line or missing key instead of skipping and counting it",
    )
    parser.add_argument("--max-docs", type=int, help="stop after this many documents")
    parser.add_argument("--max-bytes", type=int, help="stop after this many bytes of text")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: no output was published (partial work is only in a hidden "
            ".*.partial-* folder next to the output, which was removed)",
            file=sys.stderr,
        )
        return 130


def _train_tokenizer(args) -> int:
    options = TokenizerOptions(
        inputs=args.input,
        output=args.output,
        vocab_size=args.vocab_size,
        library=args.library,
        model_type=args.model_type,
        normalization=args.normalization,
        byte_fallback=args.byte_fallback,
        special_tokens=args.special_tokens,
        character_coverage=args.character_coverage,
        input_sentence_size=args.input_sentence_size,
        json_key=args.json_key,
        txt_unit=args.txt_unit,
        strict=args.strict,
        max_docs=args.max_docs,
        max_bytes=args.max_bytes,
        num_threads=args.num_threads,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    check_tokenizer_options(options)
    if options.library == "tokenizers":
        check_bpe_options(options)
    sources = resolve_inputs(options.inputs)
    size = sum(source.size for source in sources)
    print(
        f"train-tokenizer: {options.model_type} vocab {options.vocab_size:,} on "
        f"{count_of(len(sources), 'file')} ({size / 1e6:,.1f} MB) -> {options.output}"
        + ("/ (Hugging Face tokenizers)" if options.library == "tokenizers" else ".model")
        + (f", {len(options.special_tokens)} special tokens" if options.special_tokens else "")
        + (", byte fallback" if options.byte_fallback and options.library == "sentencepiece" else "")
    )
    result = (train_bpe if options.library == "tokenizers" else train_tokenizer)(options, sources)
    _print_problems(result.report)
    print(result.summary())
    return 0


def _preprocess(args) -> int:
    options = PreprocessOptions(
        inputs=args.input,
        output=args.output,
        tokenizer=args.tokenizer,
        json_key=args.json_key,
        txt_unit=args.txt_unit,
        workers=args.workers,
        split=args.split,
        valid_docs=args.valid_docs,
        dtype=args.dtype,
        strict=args.strict,
        overwrite=args.overwrite,
        max_docs=args.max_docs,
        max_bytes=args.max_bytes,
        mpi=args.mpi,
        progress=not args.quiet,
    )
    result = preprocess(options)
    if result.is_main:
        _print_problems(result.report)
        print(result.summary())
    return 0


def _merge(args) -> int:
    result = merge(args.shards, args.output, overwrite=args.overwrite, progress=not args.quiet)
    print(result.summary())
    return 0


def _inspect(args) -> int:
    lines = inspect_dataset(
        args.prefix, args.tokenizer, samples=args.samples, max_chars=args.max_chars, progress=not args.quiet
    )
    print("\n".join(lines))
    return 0


def _print_problems(report) -> None:
    """The first few places where input was skipped or repaired, so they can be found and fixed."""
    if report.examples:
        print(f"skipped or repaired input ({report.problems()}); first cases:", file=sys.stderr)
        for example in report.examples:
            print(f"  {example}", file=sys.stderr)


COMMANDS = {
    "train-tokenizer": _train_tokenizer,
    "preprocess": _preprocess,
    "merge": _merge,
    "inspect": _inspect,
}
