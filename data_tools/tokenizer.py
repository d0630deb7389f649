"""Train and load SentencePiece tokenizers.

Training reads documents through corpus.py (so it accepts the same inputs as preprocess) and feeds
SentencePiece their lines. For huge corpora `input_sentence_size` caps what SentencePiece keeps:
it samples that many lines uniformly (reservoir sampling, seeded) from everything it is fed.
Ids 0, 1, 2 are <unk>, <s>, </s>; </s> is the end-of-document token preprocess appends.

Normalization is `identity` by default, with whitespace kept as it is (as in Llama's tokenizer):
SentencePiece's usual nmt_nfkc rule folds runs of spaces and drops control characters, which would
erase the indentation of code and make decode(encode(text)) differ from the text. Training sees
the corpus line by line, so a newline is never a learned piece: it is encoded by byte fallback as
<0x0A> (without byte fallback it becomes <unk>). `--normalization nmt_nfkc` restores
SentencePiece's default behaviour for prose.
"""

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import sentencepiece as spm
from tqdm import tqdm

from data_tools import DataError, count_of
from data_tools.corpus import CorpusReport, Source, cap_documents, read_documents
from mymoe.tokenizer import TokenizerError
from mymoe.tokenizer import load_tokenizer as load_any_tokenizer

MODEL_TYPES = ("bpe", "unigram")
NORMALIZATIONS = ("identity", "nmt_nfkc")
RESERVED_PIECES = ("<unk>", "<s>", "</s>")
# SentencePiece silently drops sentences longer than max_sentence_length (4192 bytes by default);
# long lines are cut at whitespace below this many characters (4 UTF-8 bytes at most each).
MAX_SENTENCE_CHARS = 1000


@dataclass
class TokenizerOptions:
    inputs: list[str]
    output: str  # prefix: writes <output>.model and <output>.vocab (library tokenizers: the folder <output>/)
    library: str = "sentencepiece"  # or "tokenizers": byte-level BPE with Hugging Face tokenizers (hf_bpe.py)
    vocab_size: int = 8000
    model_type: str = "bpe"
    normalization: str = "identity"
    byte_fallback: bool = True
    special_tokens: list[str] = field(default_factory=list)
    character_coverage: float = 0.9995
    input_sentence_size: int = 0  # 0 = keep every line
    json_key: str = "text"
    txt_unit: str = "file"
    strict: bool = False
    max_docs: int | None = None
    max_bytes: int | None = None
    num_threads: int = os.cpu_count() or 1
    seed: int = 1234
    overwrite: bool = False
    progress: bool = True


@dataclass
class TokenizerResult:
    model_path: str
    vocab_path: str
    vocab_size: int
    documents: int
    lines: int
    seconds: float
    report: CorpusReport

    def summary(self) -> str:
        problems = self.report.problems()
        return (
            f"wrote {self.model_path} and {self.vocab_path}: vocab {self.vocab_size:,}, trained on "
            f"{self.lines:,} lines of {self.documents:,} documents in {self.seconds:.1f} s"
            + (f"; skipped {problems}" if problems else "")
        )


def load_tokenizer(model_path: str):
    """A SentencePiece .model, or a Hugging Face tokenizer.json (file or model folder): both with
    SentencePieceProcessor's methods (mymoe.tokenizer)."""
    try:
        return load_any_tokenizer(model_path)
    except TokenizerError as error:
        raise DataError(str(error)) from None


def end_of_document_id(tokenizer, model_path: str) -> int:
    eod = tokenizer.eos_id()
    if eod < 0:
        raise DataError(
            f"tokenizer {model_path} has no EOS token, and preprocess appends EOS to end every "
            f"document; retrain it with `python -m data_tools train-tokenizer` (which keeps </s>), "
            f"or name it as eos_token in the tokenizer_config.json beside a tokenizer.json"
        )
    return eod


def check_tokenizer_options(options: TokenizerOptions) -> None:
    if options.model_type not in MODEL_TYPES:
        raise DataError(f"--model-type {options.model_type!r} is not one of {MODEL_TYPES}")
    if options.normalization not in NORMALIZATIONS:
        raise DataError(f"--normalization {options.normalization!r} is not one of {NORMALIZATIONS}")
    specials = options.special_tokens
    if any(not token for token in specials):
        raise DataError(f"--special-tokens {specials} holds an empty token; remove it")
    if len(set(specials)) != len(specials):
        raise DataError(f"--special-tokens {specials} repeats a token; list each once")
    clashes = sorted(set(specials) & set(RESERVED_PIECES))
    if clashes:
        raise DataError(f"--special-tokens {clashes} are already in every vocabulary (ids 0-2); drop them")
    fixed = len(RESERVED_PIECES) + len(specials) + (256 if options.byte_fallback else 0)
    if options.vocab_size <= fixed:
        raise DataError(
            f"--vocab-size {options.vocab_size} leaves no room for learned pieces: "
            f"{len(RESERVED_PIECES)} reserved + {len(specials)} special"
            + (" + 256 byte-fallback" if options.byte_fallback else "")
            + f" = {fixed}; use --vocab-size above {fixed}"
            + (" or --no-byte-fallback" if options.byte_fallback else "")
        )
    if not 0.9 <= options.character_coverage <= 1.0:
        raise DataError(
            f"--character-coverage {options.character_coverage} must be in [0.9, 1.0] "
            f"(0.9995 suits most languages, 1.0 small alphabets)"
        )
    if options.input_sentence_size < 0:
        raise DataError(f"--input-sentence-size {options.input_sentence_size} must be >= 0")
    if options.num_threads < 1:
        raise DataError(f"--num-threads {options.num_threads} must be >= 1")
    if options.library not in ("sentencepiece", "tokenizers"):
        raise DataError(f"--library {options.library!r} is not sentencepiece or tokenizers")
    if options.library == "tokenizers":  # data_tools.hf_bpe checks the rest (the cli calls it)
        return
    for path in (options.output + ".model", options.output + ".vocab"):
        if os.path.exists(path) and not options.overwrite:
            raise DataError(f"{path} already exists; pass --overwrite to replace it, or choose another --output")


def train_tokenizer(options: TokenizerOptions, sources: list[Source]) -> TokenizerResult:
    """Train a SentencePiece model on `sources` (resolved inputs); `check_tokenizer_options` must have
    passed. (--library tokenizers trains with data_tools.hf_bpe.train_bpe instead.)"""
    started = time.perf_counter()
    report = CorpusReport()
    counts = {"documents": 0, "lines": 0}
    documents = cap_documents(
        read_documents(sources, report, options.json_key, options.txt_unit, options.strict),
        options.max_docs,
        options.max_bytes,
    )
    total_bytes = sum(source.size for source in sources)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="reading", disable=not options.progress)
    lines = _lines(documents, counts, report, bar)
    # SentencePiece reports an empty input with an obscure message; look ahead for one line.
    first = next(lines, None)
    if first is None:
        bar.close()
        problems = report.problems()
        raise DataError(
            f"no text found in {count_of(len(sources), 'input file')}"
            + (f" ({problems})" if problems else "")
            + f"; check the inputs and --json-key (now {options.json_key!r})"
        )

    folder, name = os.path.split(os.path.abspath(options.output))
    os.makedirs(folder, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=folder)
    keep_whitespace = options.normalization == "identity"
    try:
        spm.set_random_generator_seed(options.seed)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_chain(first, lines),
                model_prefix=os.path.join(staging, "tokenizer"),
                vocab_size=options.vocab_size,
                model_type=options.model_type,
                byte_fallback=options.byte_fallback,
                user_defined_symbols=options.special_tokens,
                character_coverage=options.character_coverage,
                normalization_rule_name=options.normalization,
                remove_extra_whitespaces=not keep_whitespace,
                allow_whitespace_only_pieces=keep_whitespace,
                input_sentence_size=options.input_sentence_size,
                shuffle_input_sentence=True,
                num_threads=options.num_threads,
                unk_id=0,
                bos_id=1,
                eos_id=2,
                pad_id=-1,
                minloglevel=2,  # SentencePiece logs every step at level 0; keep the progress bar
            )
        except RuntimeError as error:
            raise DataError(
                f"SentencePiece failed: {error}. If the vocabulary is too large for this little "
                f"text, lower --vocab-size or add text"
            ) from None
        bar.close()
        model_path, vocab_path = options.output + ".model", options.output + ".vocab"
        # .vocab is a readable listing; .model is what everyone loads, so it lands last.
        os.replace(os.path.join(staging, "tokenizer.vocab"), vocab_path)
        os.replace(os.path.join(staging, "tokenizer.model"), model_path)
    finally:
        bar.close()
        shutil.rmtree(staging, ignore_errors=True)
    return TokenizerResult(
        model_path=model_path,
        vocab_path=vocab_path,
        vocab_size=spm.SentencePieceProcessor(model_file=model_path).vocab_size(),
        documents=counts["documents"],
        lines=counts["lines"],
        seconds=time.perf_counter() - started,
        report=report,
    )


def _lines(documents: Iterator[str], counts: dict, report: CorpusReport, bar) -> Iterator[str]:
    for text in documents:
        counts["documents"] += 1
        for line in text.split("\n"):
            if not line.strip():
                continue
            # Leading whitespace stays: it is the indentation of code.
            for piece in _cut(line.rstrip()):
                counts["lines"] += 1
                yield piece
        bar.update(report.bytes_read - bar.n)


def _cut(line: str) -> Iterator[str]:
    """Split a line into pieces of at most MAX_SENTENCE_CHARS, at whitespace where possible."""
    while len(line) > MAX_SENTENCE_CHARS:
        cut = line.rfind(" ", 0, MAX_SENTENCE_CHARS)
        cut = cut if cut > 0 else MAX_SENTENCE_CHARS
        yield line[:cut]
        line = line[cut:].lstrip()
    if line:
        yield line


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest
