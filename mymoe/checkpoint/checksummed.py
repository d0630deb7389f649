"""torch.distributed.checkpoint's file storage with a crc32 for every record, taken as its bytes pass.

The files stay DCP's own (one torch.save record per tensor, listed in `.metadata`), so any DCP reader reads
them. What changes is how the bytes move:

    save   each record's crc32, its file's and each tensor's come from the bytes as they are written, each
           byte hashed once (the tensor's bytes by torch.save itself, for its zip entry; the file is never
           read back); the disk takes each file as it grows, so the closing fsync is short; a tensor that
           is a view of a larger one (one expert of a stacked weight) is written from its own bytes where
           DCP would first clone it
    load   each record is read once, front to back: its small zip header and tail into a scratch buffer,
           the tensor's bytes straight into the tensor DCP asks for, and hashed from there on a second
           thread while the next record is read. A record whose crc32 differs from the saved one raises
           before read_data returns, and dcp.load raises it on every rank.

The tensors filled are load targets (fresh tensors, layout.load_targets), never the live weights: the
trainer copies them in only once every rank has read and verified its whole share, so a refused checkpoint
leaves the running model as it was. Verifying records rather than files lets each rank read only its own
share: in a resume most of what it needs is its own file, but the replicated tensors are spread over every
rank's file.
"""

from __future__ import annotations

import io
import os
import queue
import struct
import threading
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, FileSystemWriter, _split_by_size_and_type
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, SavePlan, SavePlanner
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from mymoe.checkpoint.storage import CheckpointError, SafeFileSystemReader, crc32_combine, file_size_problem
from mymoe.checkpoint.storage import tensor_crc32

ZIP_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # signature ... name length, extra length
ZIP_DATA_DESCRIPTOR = b"PK\x07\x08"
SYNC_AHEAD_BYTES = 64 << 20
LARGE_WRITE_BYTES = 64 << 10  # smaller writes are hashed as they pass: looking for a descriptor is not worth it


# ---------------------------------------------------------------------------------------------------
# save


class HashingStream:
    """A file opened for writing that keeps the crc32 of each record as torch.save writes it, hashing every
    byte once.

    torch.save's zip writer already takes the crc32 of each entry it stores and writes it in the entry's data
    descriptor, right after the entry's bytes. So a large write (a tensor's bytes) is not hashed again: its
    crc32 is read from the descriptor that follows it and folded into the record's with crc32_combine. Small
    writes (zip headers, the pickle) are hashed as they pass, and so is a large write that no matching
    descriptor follows. The file's crc32 is the records' crc32s combined."""

    def __init__(self, file):
        self.file = file
        self.size = 0
        self.crc = 0
        self.record_crc = 0
        self.record_start = 0
        self.entry_crcs: list[int] = []  # crc32 of each large entry of the current record, as torch.save took it
        self.pending: memoryview | None = None  # a large write whose crc32 should follow in its descriptor

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.file.write(view)
        if self.pending is not None:
            self._settle(view)
        if view.nbytes >= LARGE_WRITE_BYTES:
            self.pending = view
        else:
            self.record_crc = zlib.crc32(view, self.record_crc)
        self.size += view.nbytes
        return view.nbytes

    def _settle(self, following: memoryview) -> None:
        """Fold the pending large write into the record's crc32: from `following` when it is that write's
        zip data descriptor (signature, crc32, then both sizes equal to the write's), else by hashing it."""
        pending, self.pending = self.pending, None
        crc = descriptor_crc(following, pending.nbytes)
        if crc is None:
            crc = zlib.crc32(pending)
        self.entry_crcs.append(crc)
        self.record_crc = crc32_combine(self.record_crc, crc, pending.nbytes)

    def start_record(self) -> None:
        self.record_crc, self.record_start, self.entry_crcs = 0, self.size, []

    def end_record(self) -> int:
        """The record's crc32 (its file's crc32 moves past it)."""
        if self.pending is not None:
            self._settle(memoryview(b""))
        self.crc = crc32_combine(self.crc, self.record_crc, self.size - self.record_start)
        return self.record_crc

    def flush(self) -> None:
        self.file.flush()


def descriptor_crc(view: memoryview, entry_bytes: int) -> int | None:
    """The crc32 in a zip data descriptor for an entry of `entry_bytes` stored bytes, or None if `view` is not
    one (zip64 descriptors carry 8-byte sizes)."""
    if view.nbytes not in (16, 24) or view[:4] != ZIP_DATA_DESCRIPTOR:
        return None
    size_format = "<II" if view.nbytes == 16 else "<QQ"
    if struct.unpack(size_format, view[8:]) != (entry_bytes, entry_bytes):
        return None
    return struct.unpack("<I", view[4:8])[0]


def own_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor over a storage of exactly its own bytes, contiguous, so torch.save writes just them.

    A row of a stacked expert weight shares the stack's storage; torch.save would write all of it, which
    is why DCP clones such views. Wrapping the row's bytes through numpy gives a storage of the row alone
    without copying."""
    if tensor.numel() == 0 or not tensor.is_contiguous():  # (an empty shard: numpy cannot wrap it)
        return tensor.clone(memory_format=torch.contiguous_format)
    if tensor.untyped_storage().nbytes() == tensor.nbytes:
        return tensor
    raw = tensor.reshape(-1).view(torch.uint8).numpy()
    return torch.from_numpy(raw).view(tensor.dtype).reshape(tensor.shape)


def write_record(stream: HashingStream, tensor: torch.Tensor) -> tuple[int, int]:
    """torch.save one tensor at the stream's end; returns (the record's crc32, the tensor bytes' crc32)."""
    tensor = own_bytes(tensor.detach().cpu())
    stream.start_record()
    torch.save(tensor, stream)
    record_crc = stream.end_record()  # (the tensor is alive till here: a pending write may still be hashed)
    large = stream.entry_crcs
    return record_crc, large[0] if len(large) == 1 else tensor_crc32(tensor)


class ChecksummingWriter(FileSystemWriter):
    """DCP's file writer (one file per rank and writer thread, fsynced) that records, as it writes, the size
    and crc32 of each file (`files`), the crc32 of each record by its offset (`records`) and of each tensor
    written whole by its key (`tensors`: the expert checksums come from it without another pass)."""

    def __init__(self, path: Path, thread_count: int = 1):
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=thread_count, overwrite=True)
        self.files: dict[str, dict[str, int]] = {}
        self.records: dict[str, dict[str, int]] = {}
        self.tensors: dict[str, int] = {}

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        buckets = _split_by_size_and_type(self.thread_count, plan.items)
        names = [f"{plan.storage_data.prefix}{index}{DEFAULT_SUFFIX}" for index in range(len(buckets))]
        with ThreadPoolExecutor(max_workers=len(buckets)) as pool:
            written = list(pool.map(lambda name, items: self._write_file(name, items, planner), names, buckets))
        future: Future[list[WriteResult]] = Future()
        future.set_result([result for results in written for result in results])
        return future

    def _write_file(self, name: str, items: list, planner: SavePlanner) -> list[WriteResult]:
        results, records = [], {}
        with open(Path(self.path) / name, "wb") as file, SyncAhead(file) as sync:
            stream = HashingStream(file)
            for item in items:
                if item.type == WriteItemType.BYTE_IO:
                    raise CheckpointError(
                        f"checkpoint item '{item.index.fqn}' is not a tensor: mymoe checkpoints hold tensors "
                        f"only, everything else belongs in the manifest"
                    )
                offset = stream.size
                records[str(offset)], tensor_crc = write_record(stream, planner.resolve_data(item))
                chunk = item.tensor_data.chunk
                if not any(chunk.offsets) and chunk.sizes == item.tensor_data.size:
                    self.tensors[item.index.fqn] = tensor_crc
                length = stream.size - offset
                results.append(WriteResult(item.index, length, _StorageInfo(name, offset, length)))
                sync.wrote(stream.size)
            sync.finish()
        self.files[name] = {"bytes": stream.size, "crc32": stream.crc}
        self.records[name] = records
        return results


class SyncAhead:
    """Hands a file being written to the disk as it grows: each time another SYNC_AHEAD_BYTES have been
    written, a thread fdatasyncs what is there while the next records are serialised, so the fsync in
    `finish` (which alone makes the file durable, and comes before anything is committed) has little left
    to wait for. An error of an early sync is raised by `finish`: after a failed sync the kernel may have
    dropped the pages, and a later fsync can succeed without them."""

    def __init__(self, file):
        self.file = file
        self.requested_at = 0
        self.wanted, self.closing = threading.Event(), False
        self.error: OSError | None = None
        self.thread = threading.Thread(target=self._run, name="mymoe-checkpoint-sync", daemon=True)

    def __enter__(self) -> "SyncAhead":
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.closing = True
        self.wanted.set()
        self.thread.join()  # before the file closes: its descriptor must not be synced once reused

    def _run(self) -> None:
        while True:
            self.wanted.wait()
            self.wanted.clear()
            if self.closing or self.error is not None:
                return
            try:
                os.fdatasync(self.file.fileno())
            except OSError as error:
                self.error = error

    def wrote(self, size: int) -> None:
        if size - self.requested_at >= SYNC_AHEAD_BYTES:
            self.file.flush()
            self.requested_at = size
            self.wanted.set()

    def finish(self) -> None:
        self.__exit__()
        if self.error is not None:
            raise self.error
        self.file.flush()
        os.fsync(self.file.fileno())


# ---------------------------------------------------------------------------------------------------
# load


class ChecksummedReader(SafeFileSystemReader):
    """Reads each record DCP asks for once, hashing it as it goes, and refuses one whose crc32 differs from
    `records` (file name -> {offset: crc32}, as ChecksummingWriter recorded it); `files` gives each file's
    saved size, so a truncated file is named as such before any of it is read."""

    def __init__(self, path: Path, files: dict[str, dict], records: dict[str, dict[str, int]]):
        super().__init__(path)
        self.files, self.records = files, records
        self.metadata: Metadata | None = None

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        self.metadata = metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, list] = {}
        for request in plan.items:
            per_file.setdefault(self.storage_data[request.storage_index].relative_path, []).append(request)
        verifier = RecordVerifier()
        try:
            self._read_files(per_file, planner, verifier)
        finally:
            verifier.finish()
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _read_files(self, per_file: dict[str, list], planner: LoadPlanner, verifier: "RecordVerifier") -> None:
        for name, requests in per_file.items():
            path = Path(self.path) / name
            if name not in self.files:
                raise CheckpointError(f"{path} is not listed in the manifest: the DCP index does not match it")
            problem = file_size_problem(path, self.files[name])
            if problem is not None:
                raise CheckpointError(problem)
            with open(path, "rb") as file:
                for request in sorted(requests, key=lambda r: self.storage_data[r.storage_index].offset):
                    if request.type == LoadItemType.BYTE_IO:
                        planner.load_bytes(request, None)  # TensorsOnlyLoadPlanner refuses it by name
                    else:
                        self._read_tensor(file, path, request, planner, verifier)

    def _read_tensor(self, file, path: Path, request, planner: LoadPlanner, verifier: "RecordVerifier") -> None:
        info = self.storage_data[request.storage_index]
        fqn = request.storage_index.fqn
        saved_crc = self.records.get(info.relative_path, {}).get(str(info.offset))
        if saved_crc is None:
            raise CheckpointError(
                f"{path} has no crc32 saved for the record of '{fqn}' at byte {info.offset}: the DCP index "
                f"does not match the manifest, the checkpoint is corrupt"
            )
        entry = self.metadata.state_dict_metadata[fqn]
        chunk = next(c for c in entry.chunks if c.offsets == request.storage_index.offset)
        dtype = entry.properties.dtype
        try:
            data_start, data_bytes = tensor_bytes_in_record(file, info, path, fqn)
            if data_bytes != chunk.sizes.numel() * dtype.itemsize:
                raise CheckpointError(
                    f"{path}: the record of '{fqn}' holds {data_bytes} bytes of data but the index says "
                    f"{list(chunk.sizes)} x {dtype}: the checkpoint is corrupt"
                )
        except CheckpointError:
            # a damaged zip directory is most often just damage: say so when the checksum agrees
            file.seek(info.offset)
            record = bytearray(info.length)
            read_exactly(file, memoryview(record), path)
            check_record(zlib.crc32(record), saved_crc, path, fqn, info)
            raise
        target = planner.resolve_tensor(request).detach()
        whole = all(o == 0 for o in request.storage_offsets) and list(request.lengths) == list(chunk.sizes)
        direct = whole and target.device.type == "cpu" and target.dtype == dtype and target.is_contiguous()
        # the saved chunk whole into the target, or (a part of it, another dtype or device) into a buffer
        landing = target if direct else torch.empty(chunk.sizes, dtype=dtype)
        file.seek(info.offset)
        parts = [
            bytearray(data_start),
            landing.reshape(-1).view(torch.uint8).numpy(),
            bytearray(info.length - data_start - data_bytes),
        ]
        for part in parts:
            read_exactly(file, memoryview(part), path)
        verifier.check(parts, saved_crc, (path, fqn, info))
        if not direct:
            target.copy_(narrow_tensor_by_index(landing, request.storage_offsets, request.lengths))
        planner.commit_tensor(request, target)


def check_record(crc: int, saved_crc: int, path: Path, fqn: str, info: _StorageInfo) -> None:
    if crc != saved_crc:
        raise CheckpointError(
            f"{path} fails its checksum in the record of '{fqn}' (bytes {info.offset}-"
            f"{info.offset + info.length}: crc32 {crc:08x}, saved {saved_crc:08x}): the file is corrupt"
        )


class RecordVerifier:
    """Checks each record's crc32 on a thread of its own, in the order the records were read, while the
    reader goes on to the next: zlib.crc32 lets go of the GIL, so hashing one record overlaps reading the
    following one, and every byte is still hashed from the memory it was read into. `finish` waits for the
    last record and raises the first that failed, so read_data (and dcp.load on every rank) still fails
    before anything it filled is used."""

    def __init__(self):
        self.records: queue.SimpleQueue = queue.SimpleQueue()
        self.error: CheckpointError | None = None
        self.thread = threading.Thread(target=self._run, name="mymoe-checkpoint-verify", daemon=True)
        self.thread.start()

    def check(self, parts: list, saved_crc: int, where: tuple) -> None:
        """Queue a record, read as `parts` (buffers, in file order), against its saved crc32."""
        self.records.put((parts, saved_crc, where))

    def _run(self) -> None:
        while (record := self.records.get()) is not None:
            parts, saved_crc, where = record
            if self.error is not None:
                continue  # the load has failed already: the rest need no hashing
            crc = 0
            for part in parts:
                crc = zlib.crc32(part, crc)
            try:
                check_record(crc, saved_crc, *where)
            except CheckpointError as error:
                self.error = error

    def finish(self) -> None:
        self.records.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def read_exactly(file, into: memoryview, path: Path) -> None:
    """Fill `into` from the file's position."""
    done = 0
    while done < into.nbytes:
        count = file.readinto(into[done:])
        if not count:
            raise CheckpointError(f"{path} ends at byte {file.tell()}, inside a record: the file is truncated")
        done += count


class RecordView(io.RawIOBase):
    """One record of a shard file as a file of its own, for zipfile to find the record's directory in."""

    def __init__(self, file, start: int, length: int):
        super().__init__()
        self.file, self.start, self.length, self.position = file, start, length, 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.position, os.SEEK_END: self.length}[whence]
        self.position = min(max(base + offset, 0), self.length)
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self.length - self.position)
        self.file.seek(self.start + self.position)
        count = self.file.readinto(memoryview(buffer)[:count])
        self.position += count
        return count


def tensor_bytes_in_record(file, info: _StorageInfo, path: Path, fqn: str) -> tuple[int, int]:
    """(where the tensor's bytes start inside its torch.save record, how many there are), from the record's
    zip directory. A record holding other than one stored tensor is refused: nothing in it is unpickled."""
    try:
        archive = zipfile.ZipFile(RecordView(file, info.offset, info.length))
        storages = [entry for entry in archive.infolist() if entry.filename.rpartition("/data/")[2].isdigit()]
        if len(storages) != 1 or storages[0].compress_type != zipfile.ZIP_STORED:
            raise zipfile.BadZipFile(f"{len(storages)} tensor storages where one uncompressed one belongs")
        storage = storages[0]
        file.seek(info.offset + storage.header_offset)
        header = ZIP_LOCAL_HEADER.unpack(file.read(ZIP_LOCAL_HEADER.size))
    except (zipfile.BadZipFile, struct.error, ValueError) as error:
        raise CheckpointError(
            f"{path}: the record of '{fqn}' at byte {info.offset} is not one saved tensor ({error}): the "
            f"checkpoint is corrupt or was not written by mymoe"
        ) from None
    start = storage.header_offset + ZIP_LOCAL_HEADER.size + header[-2] + header[-1]
    if start + storage.file_size > info.length:
        raise CheckpointError(f"{path}: the record of '{fqn}' at byte {info.offset} runs past its end")
    return start, storage.file_size
