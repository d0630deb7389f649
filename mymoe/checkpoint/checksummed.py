"""torch.distributed.checkpoint's file storage with a crc32 for every record, taken as its bytes pass.

The files stay DCP's own (one torch.save record per tensor, listed in `.metadata`), so any DCP reader reads
them. What changes is how the bytes move:

    save   each record's crc32, and its file's, come from the bytes as they are written (the file is never
           read back); a tensor that is a view of a larger one (one expert of a stacked weight) is written
           from its own bytes where DCP would first clone it
    load   each record is read once, front to back, and hashed as it is read: its small zip header and tail
           into a scratch buffer, the tensor's bytes straight into the tensor DCP asks for. A record whose
           crc32 differs from the saved one raises, and dcp.load raises it on every rank.

The tensors filled are load targets (fresh tensors, layout.load_targets), never the live weights: the
trainer copies them in only once every rank has read and verified its whole share, so a refused checkpoint
leaves the running model as it was. Verifying records rather than files lets each rank read only its own
share: in a resume most of what it needs is its own file, but the replicated tensors are spread over every
rank's file.
"""

from __future__ import annotations

import io
import os
import struct
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

from mymoe.checkpoint.storage import CheckpointError, SafeFileSystemReader, file_size_problem

READ_CHUNK_BYTES = 4 << 20  # hashed right after it lands, while it is still in cache
ZIP_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # signature ... name length, extra length


# ---------------------------------------------------------------------------------------------------
# save


class HashingStream:
    """A file opened for writing that keeps the crc32 of everything written, and of the current record."""

    def __init__(self, file):
        self.file = file
        self.size = 0
        self.crc = 0
        self.record_crc = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.file.write(view)
        self.crc = zlib.crc32(view, self.crc)
        self.record_crc = zlib.crc32(view, self.record_crc)
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self.file.flush()


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


def write_record(stream: HashingStream, tensor: torch.Tensor) -> int:
    """torch.save one tensor at the stream's end; returns the record's crc32."""
    stream.record_crc = 0
    torch.save(own_bytes(tensor.detach().cpu()), stream)
    return stream.record_crc


class ChecksummingWriter(FileSystemWriter):
    """DCP's file writer (one file per rank and writer thread, fsynced) that records, as it writes, the size
    and crc32 of each file (`files`) and the crc32 of each record by its offset (`records`)."""

    def __init__(self, path: Path, thread_count: int = 1):
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=thread_count, overwrite=True)
        self.files: dict[str, dict[str, int]] = {}
        self.records: dict[str, dict[str, int]] = {}

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
        with open(Path(self.path) / name, "wb") as file:
            stream = HashingStream(file)
            for item in items:
                if item.type == WriteItemType.BYTE_IO:
                    raise CheckpointError(
                        f"checkpoint item '{item.index.fqn}' is not a tensor: mymoe checkpoints hold tensors "
                        f"only, everything else belongs in the manifest"
                    )
                offset = stream.size
                records[str(offset)] = write_record(stream, planner.resolve_data(item))
                length = stream.size - offset
                results.append(WriteResult(item.index, length, _StorageInfo(name, offset, length)))
            file.flush()
            os.fsync(file.fileno())
        self.files[name] = {"bytes": stream.size, "crc32": stream.crc}
        self.records[name] = records
        return results


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
                        self._read_tensor(file, path, request, planner)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _read_tensor(self, file, path: Path, request, planner: LoadPlanner) -> None:
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
            self._check(read_hashed(file, memoryview(bytearray(info.length)), 0, path), saved_crc, path, fqn, info)
            raise
        target = planner.resolve_tensor(request).detach()
        whole = all(o == 0 for o in request.storage_offsets) and list(request.lengths) == list(chunk.sizes)
        direct = whole and target.device.type == "cpu" and target.dtype == dtype and target.is_contiguous()
        # the saved chunk whole into the target, or (a part of it, another dtype or device) into a buffer
        landing = target if direct else torch.empty(chunk.sizes, dtype=dtype)
        file.seek(info.offset)
        crc = read_hashed(file, memoryview(bytearray(data_start)), 0, path)
        crc = read_hashed(file, memoryview(landing.reshape(-1).view(torch.uint8).numpy()), crc, path)
        crc = read_hashed(file, memoryview(bytearray(info.length - data_start - data_bytes)), crc, path)
        self._check(crc, saved_crc, path, fqn, info)
        if not direct:
            target.copy_(narrow_tensor_by_index(landing, request.storage_offsets, request.lengths))
        planner.commit_tensor(request, target)

    @staticmethod
    def _check(crc: int, saved_crc: int, path: Path, fqn: str, info: _StorageInfo) -> None:
        if crc != saved_crc:
            raise CheckpointError(
                f"{path} fails its checksum in the record of '{fqn}' (bytes {info.offset}-"
                f"{info.offset + info.length}: crc32 {crc:08x}, saved {saved_crc:08x}): the file is corrupt"
            )


def read_hashed(file, into: memoryview, crc: int, path: Path) -> int:
    """Fill `into` from the file's position, in chunks, each hashed as soon as it lands."""
    done = 0
    while done < into.nbytes:
        count = file.readinto(into[done : done + READ_CHUNK_BYTES])
        if not count:
            raise CheckpointError(f"{path} ends at byte {file.tell()}, inside a record: the file is truncated")
        crc = zlib.crc32(into[done : done + count], crc)
        done += count
    return crc


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
