"""Text -> ids -> .bin/.idx -> the same ids through megatron-core; split, merge, inspect, tokenizer."""

import gzip
import os

import numpy as np
import pytest
import sentencepiece as spm

from data_tools.builtin_corpus import SAMPLE_BYTES, builtin_files
from data_tools.corpus import resolve_inputs
from data_tools.inspect_dataset import inspect_dataset
from data_tools.merge import merge
from data_tools.split import validation_mask
from mymoe.data.indexed import IndexedTokens
from conftest import (
    SHARED_CORPUS,
    SPECIAL_TOKENS,
    documents,
    megatron_documents,
    pair_bytes,
    run_preprocess,
    write_jsonl,
    write_txt_files,
)


def test_roundtrip_megatron_reads_the_same_ids(tmp_path, tokenizer_model):
    texts = documents(seed=1, count=40)
    jsonl = write_jsonl(tmp_path / "a.jsonl", texts[:20])
    gz = tmp_path / "b.jsonl.gz"
    gz.write_bytes(gzip.compress(write_jsonl(tmp_path / "b.src", texts[20:30]).read_bytes()))
    txt_folder = tmp_path / "txt"
    write_txt_files(txt_folder, texts[30:])
    result = run_preprocess([jsonl, gz, txt_folder], tmp_path / "out", tokenizer_model)

    tokenizer = spm.SentencePieceProcessor(model_file=tokenizer_model)
    eod = tokenizer.eos_id()
    expected = [tokenizer.encode(text) + [eod] for text in texts]
    assert megatron_documents(tmp_path / "out") == expected
    ours = IndexedTokens(str(tmp_path / "out"))
    assert [ours.document(i).tolist() for i in range(ours.num_documents)] == expected
    assert ours.dtype == np.uint16  # vocab 400 fits
    # identity normalization: decoding gives back the text, indentation and non-ASCII included
    assert [tokenizer.decode(ids[:-1]) for ids in expected] == texts
    assert result.documents == [40] and result.tokens == [sum(map(len, expected))]
    assert not result.report.problems()


def test_tokenizer_keeps_special_tokens_whole_and_falls_back_to_bytes(tokenizer_model):
    tokenizer = spm.SentencePieceProcessor(model_file=tokenizer_model)
    assert [tokenizer.id_to_piece(i) for i in (0, 1, 2)] == ["<unk>", "<s>", "</s>"]
    assert [tokenizer.piece_to_id(t) for t in SPECIAL_TOKENS] == [3, 4]
    pieces = tokenizer.encode("<|user|> hello <|assistant|>", out_type=str)
    assert "<|user|>" in pieces and "<|assistant|>" in pieces
    unseen = "Ωμέγα ∑ 🙂"
    ids = tokenizer.encode(unseen)
    assert tokenizer.unk_id() not in ids
    assert tokenizer.decode(ids) == unseen


def test_train_tokenizer_cli_unigram_with_sample_cap(tmp_path, capsys):
    from data_tools.cli import main

    corpus = write_jsonl(tmp_path / "c.jsonl", documents(seed=5, count=200), key="body")
    code = main(
        [
            "train-tokenizer",
            "--input",
            str(corpus),
            "--json-key",
            "body",
            "--model-type",
            "unigram",
            "--vocab-size",
            "320",
            "--input-sentence-size",
            "200",
            "--output",
            str(tmp_path / "uni"),
            "--quiet",
            "--num-threads",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines()[0].startswith("train-tokenizer: unigram vocab 320")
    assert out.splitlines()[-1].startswith(f"wrote {tmp_path / 'uni'}.model")
    assert spm.SentencePieceProcessor(model_file=str(tmp_path / "uni.model")).vocab_size() == 320


def test_split_is_even_and_complete(tmp_path, tokenizer_model):
    texts = documents(seed=2, count=50)
    corpus = write_jsonl(tmp_path / "c.jsonl", texts)
    run_preprocess([corpus], tmp_path / "all", tokenizer_model)
    result = run_preprocess([corpus], tmp_path / "part", tokenizer_model, split=0.9)
    assert result.outputs == [str(tmp_path / "part_train"), str(tmp_path / "part_valid")]
    assert result.documents == [45, 5]

    every = megatron_documents(tmp_path / "all")
    mask = validation_mask(50, 5)
    assert mask.sum() == 5 and mask[-1] and not mask[:9].any()  # spread, one per 10 documents
    assert megatron_documents(tmp_path / "part_train") == [d for d, v in zip(every, mask) if not v]
    assert megatron_documents(tmp_path / "part_valid") == [d for d, v in zip(every, mask) if v]

    exact = run_preprocess([corpus], tmp_path / "exact", tokenizer_model, valid_docs=3)
    assert exact.documents == [47, 3]


def test_merge_of_shards_equals_one_run(tmp_path, tokenizer_model):
    texts = documents(seed=3, count=30)
    first = write_jsonl(tmp_path / "first.jsonl", texts[:12])
    second = write_jsonl(tmp_path / "second.jsonl", texts[12:])
    run_preprocess([first, second], tmp_path / "whole", tokenizer_model)
    run_preprocess([first], tmp_path / "shard_a", tokenizer_model)
    run_preprocess([second], tmp_path / "shard_b", tokenizer_model)

    result = merge(
        [str(tmp_path / "shard_a.idx"), str(tmp_path / "shard_b")],
        str(tmp_path / "merged"),
        progress=False,
        announce=lambda line: None,
    )
    assert (result.shards, result.documents) == (2, 30)
    assert pair_bytes(tmp_path / "merged") == pair_bytes(tmp_path / "whole")


def test_merge_refuses_mixed_dtypes(tmp_path, tokenizer_model):
    from data_tools import DataError

    corpus = write_jsonl(tmp_path / "c.jsonl", documents(seed=4, count=5))
    run_preprocess([corpus], tmp_path / "small", tokenizer_model)
    run_preprocess([corpus], tmp_path / "wide", tokenizer_model, dtype="int32")
    with pytest.raises(DataError, match="different token dtypes.*uint16.*int32"):
        merge(
            [str(tmp_path / "small"), str(tmp_path / "wide")],
            str(tmp_path / "m"),
            progress=False,
            announce=lambda line: None,
        )


def test_inspect_reports_counts_histogram_and_samples(tmp_path, tokenizer_model, capsys):
    from data_tools.cli import main

    texts = documents(seed=6, count=20)
    run_preprocess([write_jsonl(tmp_path / "c.jsonl", texts)], tmp_path / "d", tokenizer_model)
    lines = inspect_dataset(str(tmp_path / "d.bin"), tokenizer_model, samples=2, progress=False)
    report = "\n".join(lines)
    assert lines[0].startswith(f"{tmp_path / 'd'}.{{bin,idx}}: 20 documents, 20 sequences")
    assert "documents ending with EOD (id 2): 20 of 20" in report
    assert "--- document 0 " in report and "--- document 19 " in report
    assert texts[0][:40] in report
    assert "#" in report  # histogram bars

    assert main(["inspect", str(tmp_path / "d"), "--quiet"]) == 0
    assert "20 documents" in capsys.readouterr().out


def test_inspect_warns_about_a_foreign_tokenizer(tmp_path, tokenizer_model):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(tmp_path / "foreign.bin"), dtype=np.int32)
    builder.add_document(np.array([5, 9000, 2]), [3])
    builder.finalize(str(tmp_path / "foreign.idx"))
    report = "\n".join(inspect_dataset(str(tmp_path / "foreign"), tokenizer_model, progress=False))
    assert "WARNING: token id 9,000 is outside the vocabulary" in report


def test_builtin_stdlib_corpus_is_local_sorted_and_capped():
    sample = builtin_files("builtin:stdlib")
    full = builtin_files("builtin:stdlib-full")
    assert sample == sorted(sample) and set(sample) < set(full)
    size = sum(os.path.getsize(p) for p in sample)
    assert SAMPLE_BYTES <= size < SAMPLE_BYTES + 2_000_000
    for path in full:
        parts = path.split(os.sep)
        assert path.endswith(".py")
        assert not {"site-packages", "test", "tests"} & set(parts)
    assert [s.kind for s in resolve_inputs(["builtin:stdlib"])] == ["txt"] * len(sample)
    assert builtin_files("builtin:stdlib") == sample  # the same sample every time


def test_shared_corpus_when_present(tmp_path, tokenizer_model):
    if not SHARED_CORPUS.is_dir():
        pytest.skip(f"no shared corpus at {SHARED_CORPUS}")
    books = sorted(SHARED_CORPUS.glob("*.txt"))[:2]
    result = run_preprocess(books, tmp_path / "books", tokenizer_model, txt_unit="paragraph", max_docs=300)
    assert result.documents == [300]
    docs = megatron_documents(tmp_path / "books")
    assert len(docs) == 300 and all(d[-1] == 2 and len(d) > 1 for d in docs)
