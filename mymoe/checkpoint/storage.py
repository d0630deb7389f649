"""What lies on disk, and reading it back without running anyone's code.

A committed checkpoint is one directory per step:

    step_00000100/
      __0_0.distcp ...   torch.distributed.checkpoint data, one file per rank (its experts, its optimizer
                         slices, and the replicated tensors DCP assigned to it)
      .metadata          DCP's index of every tensor: global shape, dtype, which file and offset
      manifest.json      step, data-reader state, optimizer hyperparameters, resolved config, a
                         size + crc32 for every file above, a crc32 for every record (tensor) in the
                         data files by its offset, and one for every expert's weights
    latest               the name of the newest committed step directory

Loading never unpickles anything that could run code: tensor records are read as raw bytes
(checksummed.py; a checkpoint without record sums goes through DCP's own reader, which uses
``torch.load(weights_only=True)``), the DCP index is read with an unpickler that only
knows DCP's metadata classes and torch dtypes, and non-tensor values (which DCP would unpickle freely)
are never written or requested: they live in manifest.json.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zlib
from pathlib import Path
from typing import Any, Optional

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

MANIFEST = "manifest.json"
METADATA = ".metadata"
FORMAT_VERSION = 1
CHUNK_BYTES = 16 << 20
CRC32_POLYNOMIAL = 0xEDB88320  # reflected, as zlib.crc32 uses it


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, corrupt, unsafe or from another model; the message says which
    file or field and what to do."""


# ---------------------------------------------------------------------------------------------------
# checksums


def file_crc32(path: Path) -> tuple[int, int]:
    """(size in bytes, crc32) of a file, read in chunks."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, crc


def tensor_crc32(tensor: torch.Tensor) -> int:
    """crc32 of a tensor's bytes in row-major order (any dtype, any device)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return zlib.crc32(flat.view(torch.uint8).numpy())


def _multiply_mod_crc_polynomial(a: int, b: int) -> int:
    """a * b modulo the crc32 polynomial, in its reflected bit order (zlib's multmodp)."""
    product, mask = 0, 1 << 31
    while a:
        if a & mask:
            product ^= b
            a ^= mask
        mask >>= 1
        b = (b >> 1) ^ CRC32_POLYNOMIAL if b & 1 else b >> 1
    return product


def _powers_of_x() -> list[int]:
    """x^(2^k) modulo the polynomial for k = 0..31: squaring these gives x^(8n) for any byte count n."""
    powers = [1 << 30]  # x^1
    for _ in range(31):
        powers.append(_multiply_mod_crc_polynomial(powers[-1], powers[-1]))
    return powers


X_TO_2_TO_THE = _powers_of_x()


def crc32_combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """crc32 of A + B from crc32(A), crc32(B) and B's length, as zlib's crc32_combine (which Python's zlib
    module does not expose); a few dozen small multiplications, whatever the length."""
    shift, k, n = 1 << 31, 3, length_b  # x^0; each byte shifts A's crc by x^8 = x^(2^3)
    while n:
        if n & 1:
            shift = _multiply_mod_crc_polynomial(X_TO_2_TO_THE[k % 32], shift)
        n >>= 1
        k += 1
    return _multiply_mod_crc_polynomial(shift, crc_a) ^ crc_b


def file_size_problem(path: Path, expected: dict) -> Optional[str]:
    """Why a file is not the size the manifest recorded (missing, truncated, grown), or None."""
    if not path.exists():
        return f"{path} is missing (the checkpoint lists it with {expected['bytes']} bytes)"
    size = path.stat().st_size
    if size != expected["bytes"]:
        return f"{path} is {size} bytes but was saved with {expected['bytes']} (truncated or overwritten)"
    return None


def verify_files(directory: Path, files: dict[str, dict]) -> list[str]:
    """Problems found checking each file against its recorded size and crc32 (empty when all are sound)."""
    problems = []
    for name, expected in files.items():
        path = directory / name
        problem = file_size_problem(path, expected)
        if problem is not None:
            problems.append(problem)
            continue
        _, crc = file_crc32(path)
        if crc != expected["crc32"]:
            problems.append(
                f"{path} fails its checksum (crc32 {crc:08x}, saved {expected['crc32']:08x}): the file is corrupt"
            )
    return problems


# ---------------------------------------------------------------------------------------------------
# manifest


def write_json_durably(path: Path, value: Any) -> None:
    """Write to a temporary name, fsync, then rename: readers see the old file or the whole new one."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not path.exists():
        raise CheckpointError(
            f"{path} is missing: {directory} is not a committed checkpoint (a save that did not "
            f"finish leaves no manifest); pick another step or delete the directory"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}): the manifest is corrupt") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version={manifest.get('format_version')!r}; this version of "
            f"mymoe reads format {FORMAT_VERSION}"
        )
    return manifest


# ---------------------------------------------------------------------------------------------------
# reading DCP's index and data safely


class _MetadataUnpickler(pickle.Unpickler):
    """Rebuilds DCP's Metadata and nothing else: any other global in the pickle is refused."""

    ALLOWED_CLASSES = {
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    } | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # turns a layout's name back into torch.strided etc.
        ("pathlib", "PosixPath"),
        ("collections", "OrderedDict"),
    }  # the path DCP saved to; plain data

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED_CLASSES:
            return super().find_class(module, name)
        if module == "torch":  # dtypes, layouts and memory formats pickle as torch.<name>
            value = getattr(torch, name, None)
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        raise pickle.UnpicklingError(
            f"refusing to load global '{module}.{name}': a DCP index holds only "
            f"metadata classes, and this one could run code"
        )


def read_dcp_metadata(directory: Path) -> Metadata:
    path = directory / METADATA
    try:
        metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint has no DCP index") from None
    except Exception as error:
        raise CheckpointError(f"{path} cannot be read safely: {error}") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with the index read by the restricted unpickler above."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_dcp_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class TensorsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, refusing pickled (non-tensor) items, which it would otherwise unpickle freely."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        raise CheckpointError(
            f"checkpoint item '{read_item.dest_index.fqn}' is a pickled object; mymoe "
            f"checkpoints hold tensors only and pickled objects are never loaded"
        )
