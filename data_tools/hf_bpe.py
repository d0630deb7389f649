"""Train a byte-level BPE with the Hugging Face `tokenizers` library, the alternative to SentencePiece
(``train-tokenizer --library tokenizers``).

Writes the folder OUTPUT/ with tokenizer.json and tokenizer_config.json: preprocess, train's
data.tokenizer, generate and export-hf take that folder (or its tokenizer.json) as the tokenizer, and
transformers' AutoTokenizer loads it with the same ids. As with SentencePiece, ids 0, 1, 2 are <unk>,
<s>, </s> and </s> is the end-of-document token; special tokens follow from id 3. Byte-level BPE (GPT-2,
Llama 3, Qwen) encodes every text losslessly: no byte fallback is needed and no character is unknown.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

from data_tools import DataError, count_of
from data_tools.corpus import CorpusReport, cap_documents, read_documents
from data_tools.tokenizer import RESERVED_PIECES, TokenizerOptions, TokenizerResult

BYTE_ALPHABET = 256


def check_bpe_options(options: TokenizerOptions) -> None:
    if options.model_type != "bpe":
        raise DataError(
            f"--model-type {options.model_type} with --library tokenizers: it trains byte-level BPE "
            f"only (use --library sentencepiece for unigram)"
        )
    fixed = len(RESERVED_PIECES) + len(options.special_tokens) + BYTE_ALPHABET
    if options.vocab_size <= fixed:
        raise DataError(
            f"--vocab-size {options.vocab_size} leaves no room for merges: {len(RESERVED_PIECES)} "
            f"reserved + {len(options.special_tokens)} special + 256 bytes = {fixed}; use "
            f"--vocab-size above {fixed}"
        )
    if os.path.exists(options.output) and not options.overwrite:
        raise DataError(f"{options.output} already exists; pass --overwrite to replace it, or choose another --output")


def train_bpe(options: TokenizerOptions, sources) -> TokenizerResult:
    """Train on `sources` (resolved inputs); check_tokenizer_options and check_bpe_options must have passed."""
    try:
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    except ImportError:
        raise DataError("--library tokenizers needs the `tokenizers` package: pip install tokenizers") from None
    started = time.perf_counter()
    report = CorpusReport()
    counts = {"documents": 0}

    def documents():
        texts = read_documents(sources, report, options.json_key, options.txt_unit, options.strict)
        for text in cap_documents(texts, options.max_docs, options.max_bytes):
            counts["documents"] += 1
            yield text

    tokenizer = Tokenizer(models.BPE())
    if options.normalization == "nmt_nfkc":
        tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=options.vocab_size,
        show_progress=options.progress,
        special_tokens=list(RESERVED_PIECES) + list(options.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(documents(), trainer)
    if counts["documents"] == 0:
        problems = report.problems()
        raise DataError(
            f"no text found in {count_of(len(sources), 'input file')}"
            + (f" ({problems})" if problems else "")
            + f"; check the inputs and --json-key (now {options.json_key!r})"
        )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    output = os.path.abspath(options.output)
    parent, name = os.path.split(output)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    try:
        tokenizer.save(os.path.join(staging, "tokenizer.json"))
        with open(os.path.join(staging, "tokenizer_config.json"), "w") as file:
            json.dump(config, file, indent=2)
        if os.path.exists(output):
            shutil.rmtree(output)
        os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return TokenizerResult(
        model_path=os.path.join(options.output, "tokenizer.json"),
        vocab_path=os.path.join(options.output, "tokenizer_config.json"),
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        documents=counts["documents"],
        lines=counts["documents"],
        seconds=time.perf_counter() - started,
        report=report,
    )
