"""The checksummed writer and reader on their own (one process, no trainer): every byte hashed once at save
yet every sum that of the bytes on disk, stock DCP reads the files, a damaged record is refused however the
reading overlaps the hashing, an early sync's failure fails the save, and shared tensors are spread evenly.
"""

from __future__ import annotations

import errno
import io
import os
import threading
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

import mymoe.checkpoint.checksummed as checksummed
from mymoe.checkpoint.balance import BalancedSavePlanner, balance_shared_items
from mymoe.checkpoint.checksummed import ChecksummedReader, ChecksummingWriter, HashingStream, SyncAhead
from mymoe.checkpoint.manager import one_line_failure
from mymoe.checkpoint.storage import crc32_combine, read_dcp_metadata, tensor_crc32

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def some_tensors() -> dict[str, torch.Tensor]:
    """Large records (their crc32 read from torch.save's descriptors), small ones (hashed as they pass), a
    view into a stacked tensor, a bf16 and an empty one."""
    generator = torch.Generator().manual_seed(0)
    stacked = torch.randn(4, 64, 96, generator=generator)  # [experts, hidden, intermediate]
    return {
        "model.embed.weight": torch.randn(300, 128, generator=generator),
        "model.norm.weight": torch.randn(16, generator=generator),
        "model.experts.w_up.expert_1": stacked[1],
        "model.bf16": torch.randn(256, 256, generator=generator).to(torch.bfloat16),
        "model.empty": torch.empty(0, 8),
    }


def save(directory: Path, tensors: dict) -> ChecksummingWriter:
    writer = ChecksummingWriter(directory)
    dcp.save(tensors, storage_writer=writer, planner=BalancedSavePlanner(), no_dist=True)
    return writer


def empty_like_all(tensors: dict) -> dict:
    return {key: torch.empty_like(value) for key, value in tensors.items()}


def failure_of(call) -> str:
    """How DCP reports the failure of a save or load, as the manager does (one line, the first rank's)."""
    with pytest.raises(CheckpointException) as error:
        call()
    return one_line_failure(error.value)


def test_crc32_combine_is_that_of_the_concatenation():
    first = os.urandom(1000)
    for length in (0, 1, 7, 64, 4096, 65537, 3 << 20):
        second = os.urandom(length)
        assert crc32_combine(zlib.crc32(first), zlib.crc32(second), length) == zlib.crc32(first + second), length


def test_sums_taken_at_save_are_those_of_the_bytes_on_disk(tmp_path):
    """The large writes are not hashed again, yet the file's, each record's and each tensor's crc32 match."""
    tensors = some_tensors()
    writer = save(tmp_path, tensors)
    metadata = read_dcp_metadata(tmp_path)
    (name,) = writer.files
    data = (tmp_path / name).read_bytes()
    assert writer.files[name] == {"bytes": len(data), "crc32": zlib.crc32(data)}
    assert writer.records[name] == {
        str(info.offset): zlib.crc32(data[info.offset : info.offset + info.length])
        for info in metadata.storage_data.values()
    }
    assert writer.tensors == {key: tensor_crc32(value) for key, value in tensors.items()}
    for info in metadata.storage_data.values():  # whole zips still: every entry's own crc32 is right
        assert zipfile.ZipFile(io.BytesIO(data[info.offset : info.offset + info.length])).testzip() is None


def test_a_large_write_without_its_descriptor_is_hashed_as_it_passes(tmp_path):
    with open(tmp_path / "raw", "wb") as file:
        stream = HashingStream(file)
        stream.start_record()
        big = os.urandom(checksummed.LARGE_WRITE_BYTES * 2)
        stream.write(b"header")
        stream.write(big)
        stream.write(b"PK\x07\x08" + bytes(12))  # a descriptor of other sizes: not this write's
        stream.write(big)  # and one with nothing after it
        record_crc = stream.end_record()
    data = (tmp_path / "raw").read_bytes()
    assert record_crc == stream.crc == zlib.crc32(data)
    assert stream.entry_crcs == [zlib.crc32(big), zlib.crc32(big)]


def test_stock_dcp_reader_reads_the_files(tmp_path):
    tensors = some_tensors()
    save(tmp_path, tensors)
    stock = empty_like_all(tensors)
    dcp.load(stock, storage_reader=FileSystemReader(tmp_path), no_dist=True)
    for key, value in tensors.items():
        assert torch.equal(stock[key], value), key


def checked_load(directory: Path, writer: ChecksummingWriter, tensors: dict) -> dict:
    loaded = empty_like_all(tensors)
    reader = ChecksummedReader(directory, writer.files, writer.records)
    dcp.load(loaded, storage_reader=reader, no_dist=True)
    return loaded


def test_checked_reader_reads_every_tensor_whole(tmp_path):
    tensors = some_tensors()
    loaded = checked_load(tmp_path, save(tmp_path, tensors), tensors)
    for key, value in tensors.items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("record", ["first", "last"])
def test_a_flipped_bit_is_refused_whichever_record_holds_it(tmp_path, record):
    """The crc32s are checked on another thread while the next records are read: a bad first record still
    fails the load, and so does the last one, checked only after every read is done."""
    tensors = some_tensors()
    writer = save(tmp_path, tensors)
    storage = read_dcp_metadata(tmp_path).storage_data.items()
    large = sorted([(index, info) for index, info in storage if info.length > 10_000], key=lambda i: i[1].offset)
    index, info = large[0] if record == "first" else large[-1]
    path = tmp_path / info.relative_path
    data = bytearray(path.read_bytes())
    data[info.offset + info.length // 2] ^= 0x10  # inside the tensor's bytes
    path.write_bytes(bytes(data))
    failure = failure_of(lambda: checked_load(tmp_path, writer, tensors))
    assert f"rank 0: CheckpointError: {path} fails its checksum in the record of '{index.fqn}'" in failure


def test_a_failed_early_sync_fails_the_file(tmp_path, monkeypatch):
    """After a failed fdatasync the kernel may drop the pages and a later fsync succeed: the first error is
    the one that counts."""
    tried = threading.Event()

    def failing(fd):
        tried.set()
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(checksummed.os, "fdatasync", failing)
    with open(tmp_path / "shard", "wb") as file, SyncAhead(file) as sync:
        file.write(b"x" * 100)
        sync.wrote(checksummed.SYNC_AHEAD_BYTES)
        assert tried.wait(timeout=30)
        with pytest.raises(OSError, match="Input/output error"):
            sync.finish()


def write_item(fqn: str, numel: int) -> WriteItem:
    size = torch.Size([numel])
    return WriteItem(
        index=MetadataIndex(fqn, [0]),
        type=WriteItemType.TENSOR,
        tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(offsets=torch.Size([0]), sizes=size),
            properties=TensorProperties(dtype=torch.float32),
            size=size,
        ),
    )


def test_shared_tensors_are_written_once_and_evenly():
    """Each rank's own tensors counted first, then the shared ones largest first to the lighter rank."""
    shared = [write_item(f"shared.{n}", numel) for n, numel in enumerate([50, 40, 30, 20, 10])]
    plans = [SavePlan(items=[write_item("own.0", 100), *shared]), SavePlan(items=[write_item("own.1", 40), *shared])]
    balanced = balance_shared_items(plans)
    kept = [[item.index.fqn for item in plan.items] for plan in balanced]
    assert sorted(kept[0] + kept[1]) == sorted({fqn for names in kept for fqn in names})  # each once
    assert {fqn for names in kept for fqn in names} == {"own.0", "own.1"} | {f"shared.{n}" for n in range(5)}
    written = [sum(item.tensor_data.size.numel() for item in plan.items) for plan in balanced]
    assert written == [150, 140]  # 100 + 30 + 20 | 40 + 50 + 40 + 10
