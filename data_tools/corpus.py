"""Find the input files and read documents from them, counting what had to be skipped or repaired.

Inputs are files, directories (searched recursively) or glob patterns of `.txt`, `.txt.gz`,
`.jsonl` and `.jsonl.gz` files, or a builtin corpus (`builtin:stdlib`, see builtin_corpus.py).
A JSON line is one document, its text under `json_key`; a text file is one document, or one per
paragraph or line (`txt_unit`).

Bad input never stops a run unless `strict` is set; it is counted in a `CorpusReport`:
invalid UTF-8 is replaced with U+FFFD, malformed JSON lines and lines without a string under
`json_key` are skipped, and documents with no visible text are skipped. Blank lines in a JSON-lines
file are separators, not documents, and are not counted.
"""

import glob
import gzip
import zlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from data_tools import DataError
from data_tools.builtin_corpus import BUILTIN_PREFIX, builtin_files

SUFFIXES = {".jsonl.gz": "jsonl", ".jsonl": "jsonl", ".txt.gz": "txt", ".txt": "txt"}
TXT_UNITS = ("file", "paragraph", "line")
MAX_EXAMPLES = 5  # locations of bad input quoted in the summary; the rest are only counted
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Source:
    path: str
    kind: str  # "jsonl" or "txt" (a .py file of builtin:stdlib is read as text)

    @property
    def size(self) -> int:
        return os.path.getsize(self.path)


@dataclass
class CorpusReport:
    """What reading (and tokenizing) the corpus skipped or repaired, with a few locations."""

    bytes_read: int = 0  # of the inputs on disk (compressed for .gz), for progress bars
    invalid_utf8: int = 0  # documents in which undecodable bytes were replaced with U+FFFD
    malformed_json: int = 0
    missing_key: int = 0
    empty: int = 0  # documents whose text is empty or only whitespace
    no_tokens: int = 0  # documents the tokenizer turned into nothing (filled in by preprocess)
    examples: list[str] = field(default_factory=list)

    def note(self, kind: str, where: str, what: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{where}: {what}")

    def add(self, other: "CorpusReport") -> None:
        for name in ("bytes_read", "invalid_utf8", "malformed_json", "missing_key", "empty", "no_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.examples.extend(other.examples[: MAX_EXAMPLES - len(self.examples)])

    def problems(self) -> str:
        """'2 malformed JSON, 1 empty' or '' when nothing was wrong."""
        parts = [
            (self.malformed_json, "malformed JSON"),
            (self.missing_key, "missing key"),
            (self.empty, "empty"),
            (self.no_tokens, "no tokens"),
            (self.invalid_utf8, "invalid UTF-8 (replaced)"),
        ]
        return ", ".join(f"{count:,} {label}" for count, label in parts if count)


def resolve_inputs(specs: list[str]) -> list[Source]:
    """Expand files, directories, globs and builtin names into a sorted, duplicate-free list."""
    if not specs:
        raise DataError("no inputs given; pass --input FILE|DIR|GLOB|builtin:stdlib")
    sources, seen = [], set()
    for spec in specs:
        for path in _expand(spec):
            real = os.path.realpath(path)
            # The same file reached twice (a directory and a glob inside it) would be
            # tokenized twice and leak duplicates into the data.
            if real not in seen:
                seen.add(real)
                sources.append(Source(path, _kind(path)))
    return sources


def _expand(spec: str) -> list[str]:
    if spec.startswith(BUILTIN_PREFIX):
        return builtin_files(spec)
    if os.path.isdir(spec):
        found = []
        for directory, subdirectories, names in os.walk(spec):
            subdirectories.sort()
            found.extend(os.path.join(directory, n) for n in sorted(names) if _suffix(n))
        if not found:
            raise DataError(
                f"directory {spec} holds no {', '.join(SUFFIXES)} files; point --input at the "
                f"files themselves or convert them"
            )
        return sorted(found)
    if os.path.isfile(spec):
        if not _suffix(spec):
            raise DataError(f"input {spec} is not one of {', '.join(SUFFIXES)}; rename it or convert it")
        return [spec]
    if glob.has_magic(spec):
        matches = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        supported = [p for p in matches if _suffix(p)]
        if not supported:
            raise DataError(
                f"glob {spec!r} matches {len(matches)} files and none is {', '.join(SUFFIXES)}; check the pattern"
            )
        return supported
    raise DataError(f"input {spec} does not exist (not a file, directory, glob or builtin:stdlib)")


def _suffix(path: str) -> str | None:
    return next((s for s in SUFFIXES if path.endswith(s)), None)


def _kind(path: str) -> str:
    # Only builtin corpora produce other suffixes (.py), and those are plain text.
    return SUFFIXES.get(_suffix(path), "txt")


def read_documents(
    sources: list[Source],
    report: CorpusReport,
    json_key: str = "text",
    txt_unit: str = "file",
    strict: bool = False,
) -> Iterator[str]:
    """Yield the text of every usable document, in input order; count the rest in `report`."""
    for source in sources:
        if source.kind == "jsonl":
            yield from _read_jsonl(source.path, report, json_key, strict)
        else:
            yield from _read_txt(source.path, report, txt_unit)


def _decode(raw: bytes) -> tuple[str, bool]:
    """(text, whether invalid UTF-8 had to be replaced)."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def _read_jsonl(path, report, json_key, strict):
    try:
        yield from _read_jsonl_lines(path, report, json_key, strict)
    except (OSError, EOFError, zlib.error) as error:
        if not path.endswith(".gz"):
            raise
        raise DataError(
            f"{path} is not a readable gzip file ({error}): it is corrupt or cut short; re-download or re-compress it"
        ) from None


def _read_jsonl_lines(path, report, json_key, strict):
    compressed = path.endswith(".gz")
    with open(path, "rb") as raw_file:
        lines = gzip.GzipFile(fileobj=raw_file) if compressed else raw_file
        position = 0  # compressed bytes counted so far
        for line_number, raw in enumerate(lines, start=1):
            if compressed:
                report.bytes_read += raw_file.tell() - position
                position = raw_file.tell()
            else:
                report.bytes_read += len(raw)
            if not raw.strip():
                continue
            where = f"{path}:{line_number}"
            line, invalid = _decode(raw)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                if strict:
                    raise DataError(
                        f"{where}: malformed JSON ({error.msg} at column {error.colno}); fix the "
                        f"line, or drop --strict to skip such lines"
                    ) from None
                report.note("malformed_json", where, f"malformed JSON ({error.msg})")
                continue
            text = record.get(json_key) if isinstance(record, dict) else None
            if not isinstance(text, str):
                found = sorted(record)[:5] if isinstance(record, dict) else type(record).__name__
                if strict:
                    raise DataError(
                        f"{where}: no string under key {json_key!r} (found {found}); pass "
                        f"--json-key with the right key, or drop --strict to skip such lines"
                    )
                report.note("missing_key", where, f"no string under {json_key!r} (found {found})")
                continue
            # A JSON escape like "\\udc80" decodes to a lone surrogate, which is not encodable
            # UTF-8 and would crash the tokenizer; the substring test keeps the check cheap.
            if "\\ud" in line or "\\uD" in line:
                repaired = LONE_SURROGATE.sub("\ufffd", text)
                if repaired != text:
                    text, invalid = repaired, True
            if not text.strip():
                report.note("empty", where, "empty document")
                continue
            if invalid:
                report.note("invalid_utf8", where, "invalid UTF-8 replaced with U+FFFD")
            yield text
        if compressed:
            report.bytes_read += os.path.getsize(path) - position


def _read_txt(path, report, txt_unit):
    with open(path, "rb") as raw_file:
        raw = gzip.decompress(raw_file.read()) if path.endswith(".gz") else raw_file.read()
    report.bytes_read += os.path.getsize(path)
    text, invalid = _decode(raw)
    if invalid:
        report.note("invalid_utf8", path, "invalid UTF-8 replaced with U+FFFD")
    if txt_unit == "file":
        if not text.strip():
            report.note("empty", path, "empty document")
        pieces = [text]
    elif txt_unit == "paragraph":
        pieces = re.split(r"\n[ \t\r]*\n", text)
    else:
        pieces = text.split("\n")
    # Blank paragraphs and lines are separators; only an empty file is an empty document.
    yield from (piece for piece in pieces if piece.strip())


def cap_documents(documents: Iterator[str], max_docs: int | None, max_bytes: int | None) -> Iterator[str]:
    """Stop after `max_docs` documents or once `max_bytes` of text (UTF-8) have been passed on."""
    count = text_bytes = 0
    for text in documents:
        if (max_docs is not None and count >= max_docs) or (max_bytes is not None and text_bytes >= max_bytes):
            return
        count += 1
        text_bytes += len(text.encode("utf-8"))
        yield text
