"""Our .bin/.idx writer against megatron-core's IndexedDatasetBuilder: the same bytes for the same calls."""

import subprocess
import sys

import numpy as np
import pytest

from mymoe.data.indexed import IndexedTokens, IndexedWriter

indexed_dataset = pytest.importorskip("megatron.core.datasets.indexed_dataset")


def random_documents(seed: int, count: int, vocab: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(1, 50))) for _ in range(count)]


def write_both(tmp_path, name: str, dtype, fill) -> tuple[bytes, bytes, bytes, bytes]:
    """`fill(builder)` on megatron's builder and on ours; the four files' bytes."""
    out = []
    for tag, cls in (("megatron", indexed_dataset.IndexedDatasetBuilder), ("ours", IndexedWriter)):
        prefix = tmp_path / f"{name}-{tag}"
        builder = cls(f"{prefix}.bin", dtype=dtype)
        fill(builder, tag)
        builder.finalize(f"{prefix}.idx")
        out.append(((tmp_path / f"{name}-{tag}.bin").read_bytes(), (tmp_path / f"{name}-{tag}.idx").read_bytes()))
    (mb, mi), (ob, oi) = out
    return mb, ob, mi, oi


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_documents_written_one_by_one_and_in_bulk_match_megatron(tmp_path, dtype):
    docs = random_documents(0, 40, 60000)

    def fill(builder, tag):
        if tag == "ours":  # the bulk path preprocess uses, on the first half
            half = docs[:20]
            builder.add_documents(np.concatenate(half), np.array([len(d) for d in half]))
            rest = docs[20:]
        else:
            rest = docs
        for d in rest:
            builder.add_document(d, [len(d)])

    mb, ob, mi, oi = write_both(tmp_path, "docs", dtype, fill)
    assert mb == ob and mi == oi


def test_multi_sequence_documents_and_empty_pair_match_megatron(tmp_path):
    docs = random_documents(1, 10, 1000)

    def fill(builder, tag):
        for d in docs:
            cut = len(d) // 2
            builder.add_document(d, [cut, len(d) - cut])

    mb, ob, mi, oi = write_both(tmp_path, "multi", np.uint16, fill)
    assert mb == ob and mi == oi
    mb, ob, mi, oi = write_both(tmp_path, "empty", np.uint16, lambda builder, tag: None)
    assert mb == ob and mi == oi


def test_add_index_appends_pairs_as_megatron_does(tmp_path):
    shards = []
    for i in range(3):
        prefix = tmp_path / f"shard{i}"
        writer = IndexedWriter(f"{prefix}.bin", dtype=np.int32)
        for d in random_documents(10 + i, 7, 5000):
            writer.add_document(d, [len(d)])
        writer.finalize(f"{prefix}.idx")
        shards.append(str(prefix))

    def fill(builder, tag):
        builder.add_document(np.array([1, 2, 3]), [3])
        for prefix in shards:
            builder.add_index(prefix)

    mb, ob, mi, oi = write_both(tmp_path, "merged", np.int32, fill)
    assert mb == ob and mi == oi
    merged = IndexedTokens(str(tmp_path / "merged-ours"))
    assert merged.num_documents == 1 + 3 * 7
    megatron = indexed_dataset.IndexedDataset(str(tmp_path / "merged-megatron"))
    assert all(np.array_equal(merged.document(i), megatron[i]) for i in range(len(megatron)))


def test_writing_files_imports_neither_torch_nor_megatron():
    code = (
        "import sys, data_tools.cli, data_tools.preprocess, data_tools.merge, data_tools.split; "
        "print(sorted(m for m in ('torch', 'megatron') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
