"""Bad input is repaired or skipped and counted (or refused under --strict), bad settings are refused
with the fix named, and an interrupted run never leaves a pair that looks complete."""

import json

import numpy as np
import pytest
import sentencepiece as spm

import data_tools.indexed_io
import data_tools.preprocess
from data_tools import DataError
from data_tools.cli import main
from data_tools.corpus import CorpusReport, read_documents, resolve_inputs
from data_tools.encode import encode_chunk, init_worker
from data_tools.indexed_io import choose_dtype
from data_tools.tokenizer import TokenizerOptions, check_tokenizer_options, train_tokenizer
from mymoe.data.indexed import IndexedTokens
from conftest import (
    documents,
    leftover_staging,
    megatron_documents,
    pair_bytes,
    run_preprocess,
    write_jsonl,
)


def test_invalid_utf8_is_replaced_and_counted(tmp_path, tokenizer_model):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait\n")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok \xff\xfe here"}\n{"text": "clean"}\n')
    (tmp_path / "surrogate.jsonl").write_text('{"text": "lone \\udc80 surrogate"}\n')
    result = run_preprocess(
        [tmp_path / "bad.txt", tmp_path / "bad.jsonl", tmp_path / "surrogate.jsonl"], tmp_path / "out", tokenizer_model
    )
    assert result.report.invalid_utf8 == 3
    assert "3 invalid UTF-8 (replaced)" in result.summary()
    tokenizer = spm.SentencePieceProcessor(model_file=tokenizer_model)
    texts = [tokenizer.decode(d[:-1]) for d in megatron_documents(tmp_path / "out")]
    assert texts == ["caf\ufffd au lait\n", "ok \ufffd\ufffd here", "clean", "lone \ufffd surrogate"]


def test_documents_that_tokenize_to_nothing_are_skipped_and_counted(tmp_path, nfkc_tokenizer_model):
    # nmt_nfkc drops control characters: the middle document has text but no tokens.
    corpus = write_jsonl(tmp_path / "c.jsonl", ["first words", "\x01\x02\x03", "last words"])
    result = run_preprocess([corpus], tmp_path / "out", nfkc_tokenizer_model)
    assert result.report.no_tokens == 1 and result.documents == [2]
    docs = megatron_documents(tmp_path / "out")
    assert len(docs) == 2 and all(len(d) > 1 and d[-1] == 2 for d in docs)  # never a lone EOD


def test_only_untokenizable_documents_is_an_empty_corpus(tmp_path, nfkc_tokenizer_model):
    corpus = write_jsonl(tmp_path / "c.jsonl", ["\x01", "\x02\x03"])
    with pytest.raises(DataError, match=r"no documents to write.*2 no tokens"):
        run_preprocess([corpus], tmp_path / "out", nfkc_tokenizer_model)
    assert not (tmp_path / "out.bin").exists() and not leftover_staging(tmp_path)


def test_malformed_json_and_missing_keys_are_skipped_with_file_and_line(tmp_path, tokenizer_model):
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        '{"text": "good one"}\n'
        '{"text": "broken\n'  # line 2: malformed
        "\n"  # line 3: blank, a separator, not counted
        '{"body": "wrong key"}\n'  # line 4: missing key
        '{"text": 42}\n'  # line 5: not a string
        '["a", "list"]\n'  # line 6: not an object
        '{"text": "   "}\n'  # line 7: empty
        '{"text": "good two"}\n'
    )
    result = run_preprocess([path], tmp_path / "out", tokenizer_model)
    report = result.report
    assert (report.malformed_json, report.missing_key, report.empty) == (1, 3, 1)
    assert result.documents == [2]
    assert report.examples[0].startswith(f"{path}:2: malformed JSON")
    assert report.examples[1].startswith(f"{path}:4: no string under 'text'")
    assert "1 malformed JSON, 3 missing key, 1 empty" in result.summary()


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": oops}', r"bad\.jsonl:2: malformed JSON"),
        ('{"title": "x"}', r"bad\.jsonl:2: no string under key 'text' \(found \['title'\]\)"),
    ],
)
def test_strict_fails_at_the_first_bad_line(tmp_path, tokenizer_model, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=message + ".*drop --strict"):
        run_preprocess([path], tmp_path / "out", tokenizer_model, strict=True)
    assert not (tmp_path / "out.idx").exists() and not leftover_staging(tmp_path)


def test_empty_documents_are_skipped_and_counted(tmp_path, tokenizer_model):
    (tmp_path / "a_empty.txt").write_text("")
    (tmp_path / "b_blank.txt").write_text("  \n\n\t\n")
    (tmp_path / "c_real.txt").write_text("real text")
    result = run_preprocess([tmp_path], tmp_path / "out", tokenizer_model)
    assert result.report.empty == 2 and result.documents == [1]


def test_empty_corpus_is_a_clear_error(tmp_path, tokenizer_model, capsys):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "blank.txt").write_text("   ")
    with pytest.raises(DataError, match=r"no documents to write: 2 input files gave none \(1 empty"):
        run_preprocess([tmp_path / "empty.jsonl", tmp_path / "blank.txt"], tmp_path / "out", tokenizer_model)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="holds no .jsonl.gz, .jsonl, .txt.gz, .txt files"):
        resolve_inputs([str(tmp_path / "nothing")])
    with pytest.raises(DataError, match="does not exist"):
        resolve_inputs([str(tmp_path / "missing.txt")])

    code = main(
        [
            "train-tokenizer",
            "--input",
            str(tmp_path / "empty.jsonl"),
            "--output",
            str(tmp_path / "tok"),
            "--vocab-size",
            "300",
            "--quiet",
        ]
    )
    assert code == 2
    assert "error: no text found in 1 input file;" in capsys.readouterr().err


def test_vocabulary_too_large_for_the_dtype(tmp_path, tokenizer_model, monkeypatch):
    assert choose_dtype(65499) == np.uint16 and choose_dtype(65500) == np.int32
    assert choose_dtype(65536, "uint16") == np.uint16  # ids up to 65535 still fit
    with pytest.raises(
        DataError,
        match=r"--dtype uint16 cannot hold token ids up to 69999.*"
        r"use --dtype int32",
    ):
        choose_dtype(70000, "uint16")
    # Through the command: a tokenizer that reports a 70,000-piece vocabulary.
    monkeypatch.setattr(spm.SentencePieceProcessor, "vocab_size", lambda self: 70000)
    corpus = write_jsonl(tmp_path / "c.jsonl", ["some text"])
    with pytest.raises(DataError, match="cannot hold token ids up to 69999"):
        run_preprocess([corpus], tmp_path / "out", tokenizer_model, dtype="uint16")
    result = run_preprocess([corpus], tmp_path / "auto", tokenizer_model)
    assert result.dtype == "int32"


def test_existing_output_is_refused_unless_overwrite(tmp_path, tokenizer_model, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", ["one document", "two documents"])
    run_preprocess([corpus], tmp_path / "out", tokenizer_model)
    before = pair_bytes(tmp_path / "out")
    args = [
        "preprocess",
        "--input",
        str(corpus),
        "--tokenizer",
        tokenizer_model,
        "--output",
        str(tmp_path / "out"),
        "--quiet",
    ]
    assert main(args) == 2
    assert f"{tmp_path / 'out'}.bin already exists; pass --overwrite" in capsys.readouterr().err
    assert pair_bytes(tmp_path / "out") == before
    assert main(args + ["--overwrite"]) == 0
    summary = capsys.readouterr().out.splitlines()[-1]
    assert summary.startswith(f"wrote {tmp_path / 'out'}.{{bin,idx}}")

    # the split outputs and the tokenizer are protected alike
    run_preprocess([corpus], tmp_path / "s", tokenizer_model, valid_docs=1)
    with pytest.raises(DataError, match="s_train.bin already exists"):
        run_preprocess([corpus], tmp_path / "s", tokenizer_model, valid_docs=1)
    existing = TokenizerOptions(inputs=[str(corpus)], output=tokenizer_model[: -len(".model")])
    with pytest.raises(DataError, match=r"\.model already exists; pass --overwrite"):
        check_tokenizer_options(existing)


def test_interrupted_run_leaves_no_pair_and_keeps_the_old_one(tmp_path, tokenizer_model, monkeypatch):
    corpus = write_jsonl(tmp_path / "c.jsonl", documents(seed=8, count=30))
    run_preprocess([corpus], tmp_path / "old", tokenizer_model, max_docs=5)
    before = pair_bytes(tmp_path / "old")

    calls = []

    def interrupted_encode(texts):
        calls.append(len(texts))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return encode_chunk(texts)

    monkeypatch.setattr(data_tools.preprocess, "CHUNK_CHARS", 200)  # several chunks
    monkeypatch.setattr(data_tools.preprocess, "encode_chunk", interrupted_encode)
    for output, overwrite in (("new", False), ("old", True)):
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            run_preprocess([corpus], tmp_path / output, tokenizer_model, overwrite=overwrite)
    assert not (tmp_path / "new.bin").exists() and not (tmp_path / "new.idx").exists()
    assert pair_bytes(tmp_path / "old") == before  # the interrupted overwrite changed nothing
    assert not leftover_staging(tmp_path)


def test_crash_between_renames_leaves_a_pair_that_does_not_load(tmp_path, tokenizer_model, monkeypatch):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    corpus = write_jsonl(tmp_path / "c.jsonl", ["a document", "another one"])
    real_replace = data_tools.indexed_io.os.replace

    def replace_then_die(source, target):
        if str(target).endswith(".idx"):
            raise KeyboardInterrupt  # killed after the .bin landed, before the .idx did
        real_replace(source, target)

    monkeypatch.setattr(data_tools.indexed_io.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_preprocess([corpus], tmp_path / "out", tokenizer_model)
    monkeypatch.undo()
    assert (tmp_path / "out.bin").exists() and not (tmp_path / "out.idx").exists()
    assert not IndexedDataset.exists(str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match=r"out\.idx does not exist"):
        IndexedTokens(str(tmp_path / "out"))


def test_worker_that_cannot_load_the_tokenizer_raises_instead_of_hanging(tmp_path):
    init_worker(str(tmp_path / "missing.model"), eod=2, dtype=np.uint16)
    try:
        with pytest.raises(RuntimeError, match="worker could not load tokenizer"):
            encode_chunk(["text"])
    finally:
        import data_tools.encode

        data_tools.encode._init_error = None


def test_bad_settings_name_the_value_and_the_fix(tmp_path, tokenizer_model):
    corpus = write_jsonl(tmp_path / "c.jsonl", ["a", "b"])
    with pytest.raises(DataError, match=r"--split 1.5 must be the training fraction"):
        run_preprocess([corpus], tmp_path / "o", tokenizer_model, split=1.5)
    with pytest.raises(DataError, match="2 validation documents out of 2 .* lower --valid-docs"):
        run_preprocess([corpus], tmp_path / "o", tokenizer_model, valid_docs=2)
    with pytest.raises(DataError, match="--workers 0 must be >= 1"):
        run_preprocess([corpus], tmp_path / "o", tokenizer_model, workers=0)
    with pytest.raises(DataError, match="does not exist; train one"):
        run_preprocess([corpus], tmp_path / "o", str(tmp_path / "nope.model"))
    with pytest.raises(DataError, match=r"--vocab-size 200 leaves no room.*= 259"):
        check_tokenizer_options(TokenizerOptions(inputs=[], output=str(tmp_path / "t"), vocab_size=200))
    with pytest.raises(DataError, match=r"--special-tokens \['</s>'\] are already"):
        check_tokenizer_options(TokenizerOptions(inputs=[], output=str(tmp_path / "t"), special_tokens=["</s>"]))
    options = TokenizerOptions(inputs=[str(corpus)], output=str(tmp_path / "t"), vocab_size=5000, progress=False)
    with pytest.raises(DataError, match="lower --vocab-size or add text"):
        train_tokenizer(options, resolve_inputs(options.inputs))
    assert not list(tmp_path.glob("t.*")) and not leftover_staging(tmp_path)


def test_report_counts_add_up_across_shards():
    report, other = CorpusReport(), CorpusReport()
    report.note("empty", "a.txt", "empty document")
    other.note("malformed_json", "b.jsonl:3", "malformed JSON")
    report.add(other)
    assert report.problems() == "1 malformed JSON, 1 empty"
    assert report.examples == ["a.txt: empty document", "b.jsonl:3: malformed JSON"]


def test_json_lines_read_with_another_key(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"content": "x"}) + "\n" + json.dumps({"text": "y"}) + "\n")
    report = CorpusReport()
    texts = list(read_documents(resolve_inputs([str(path)]), report, json_key="content"))
    assert texts == ["x"] and report.missing_key == 1
