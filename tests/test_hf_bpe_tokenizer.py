"""`train-tokenizer --library tokenizers`: a byte-level BPE trained with Hugging Face `tokenizers`, written as a
folder AutoTokenizer loads with our ids, that preprocess takes as --tokenizer with </s> as EOD."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_a_bpe_trained_with_tokenizers_preprocesses_to_autotokenizer_ids(tmp_path):
    from transformers import AutoTokenizer

    from data_tools.cli import main
    from mymoe.data.indexed import IndexedTokens
    from mymoe.tokenizer import load_tokenizer
    from conftest import write_jsonl
    from test_hf_tokenizers import texts

    write_jsonl(tmp_path / "corpus.jsonl", texts(300, seed=3))
    assert (
        main(
            [
                "train-tokenizer",
                "--library",
                "tokenizers",
                "--input",
                str(tmp_path / "corpus.jsonl"),
                "--output",
                str(tmp_path / "bpe"),
                "--vocab-size",
                "400",
                "--special-tokens",
                "<|user|>",
                "--quiet",
            ]
        )
        == 0
    )
    assert sorted(os.listdir(tmp_path / "bpe")) == ["tokenizer.json", "tokenizer_config.json"]
    ours, reference = load_tokenizer(tmp_path / "bpe"), AutoTokenizer.from_pretrained(tmp_path / "bpe")
    assert [ours.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<|user|>"]
    assert (ours.eos_id(), reference.eos_token_id, ours.vocab_size()) == (2, 2, 400)
    corpus = texts(100, seed=4)
    for text in corpus:
        assert ours.encode(text) == reference(text)["input_ids"]
        assert ours.decode(ours.encode(text)) == text  # byte-level: lossless
    write_jsonl(tmp_path / "docs.jsonl", corpus)
    assert (
        main(
            [
                "preprocess",
                "--input",
                str(tmp_path / "docs.jsonl"),
                "--tokenizer",
                str(tmp_path / "bpe"),
                "--output",
                str(tmp_path / "out"),
                "--quiet",
            ]
        )
        == 0
    )
    written = IndexedTokens(str(tmp_path / "out"))
    assert [written.document(i).tolist() for i in range(written.num_documents)] == [
        ours.encode(text) + [2] for text in corpus
    ]


def test_unigram_with_tokenizers_is_refused(tmp_path, capsys):
    from data_tools.cli import main
    from conftest import write_jsonl

    write_jsonl(tmp_path / "corpus.jsonl", ["some text"])
    assert (
        main(
            [
                "train-tokenizer",
                "--library",
                "tokenizers",
                "--model-type",
                "unigram",
                "--input",
                str(tmp_path / "corpus.jsonl"),
                "--output",
                str(tmp_path / "bpe"),
                "--quiet",
            ]
        )
        == 2
    )
    assert "trains byte-level BPE only" in capsys.readouterr().err
    assert not (tmp_path / "bpe").exists()
