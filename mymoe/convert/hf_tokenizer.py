"""The tokenizer of a Hugging Face export: files transformers' AutoTokenizer loads with our ids, and the
bos / eos / pad ids for config.json and generation_config.json (so ``generate`` stops at our eos).

A Hugging Face tokenizer (tokenizer.json, or a model folder) is copied with the tokenizer_config.json
and special_tokens_map.json beside it, or a tokenizer_config.json naming its special tokens is written.
A SentencePiece model becomes a Llama-style fast tokenizer: tokenizer.json as transformers' converter
writes it from the model's own settings (its normalisation, dummy prefix, whitespace handling,
byte fallback, user-defined pieces), with no BOS added, as preprocess encodes, plus
tokenizer_config.json; the .model is copied too. That tokenizer is checked on probe texts
(unicode, emoji, code, runs of whitespace) to give SentencePiece's ids before anything is written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mymoe.checkpoint.storage import CheckpointError
from mymoe.tokenizer import TokenizerError, is_huggingface, load_tokenizer, special_ids, tokenizer_file

PROBE_TEXTS = (
    "Hello world.",
    "  two leading spaces",
    "trailing  ",
    "a\n\nb\tc",
    "naïve café über Straße",
    "東京とソウル",
    "emoji 😀🎉🤖 and ZWJ 👩‍💻",
    "def f(x):\n    return x  + 1  # done\n",
    '{"key": [1, 2, 3]}',
    "x",
    " ",
    "",
)


def load_checked(path: str | Path, vocab_size: int):
    """The tokenizer at `path`, refused when its ids reach past the model's vocabulary."""
    try:
        tokenizer = load_tokenizer(path)
    except TokenizerError as error:
        raise CheckpointError(str(error)) from None
    if tokenizer.vocab_size() > vocab_size:
        raise CheckpointError(
            f"tokenizer {path} has {tokenizer.vocab_size()} pieces but the model's vocab_size is "
            f"{vocab_size}: ids past {vocab_size - 1} have no embedding; pass the tokenizer the "
            f"model was trained with"
        )
    return tokenizer


def prepare(path: str | Path, vocab_size: int, max_length: int) -> dict:
    """Everything the export writes for this tokenizer, made before anything is written:
    {"files": {name: bytes or source Path}, "ids": {bos_token_id, eos_token_id, pad_token_id}}."""
    tokenizer = load_checked(path, vocab_size)
    ids = special_ids(tokenizer)
    if is_huggingface(path):
        source = tokenizer_file(path)
        files = {"tokenizer.json": source}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (source.parent / name).is_file():
                files[name] = source.parent / name
        if "tokenizer_config.json" not in files:
            files["tokenizer_config.json"] = tokenizer_config(tokenizer, ids, max_length)
        return {"files": files, "ids": ids}
    files = {
        "tokenizer.json": sentencepiece_as_tokenizer_json(tokenizer, Path(path)),
        "tokenizer.model": tokenizer_file(path),
        "tokenizer_config.json": tokenizer_config(tokenizer, ids, max_length),
    }
    return {"files": files, "ids": ids}


def tokenizer_config(tokenizer, ids: dict, max_length: int) -> bytes:
    names = {
        f"{role}_token": tokenizer.id_to_piece(ids[f"{role}_token_id"]) if ids[f"{role}_token_id"] is not None else None
        for role in ("bos", "eos", "pad")
    }
    unk = tokenizer.unk_id() if hasattr(tokenizer, "unk_id") else -1
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **names,
        "unk_token": tokenizer.id_to_piece(unk) if unk >= 0 else None,
        # preprocess adds no BOS and our decode cleans up nothing: the same ids and text here
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
    return (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()


def sentencepiece_as_tokenizer_json(processor, path: Path) -> bytes:
    """tokenizer.json of a SentencePiece model (transformers' converter, which follows the model's own
    normalizer spec and user-defined pieces), checked to give its ids on PROBE_TEXTS."""
    try:
        from tokenizers import Tokenizer
        from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf
    except ImportError:
        raise CheckpointError(
            "writing a SentencePiece tokenizer for transformers needs `pip install transformers "
            "tokenizers protobuf`; or export without --tokenizer"
        ) from None
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(path.read_bytes())
    pieces = list(proto.pieces)
    if proto.trainer_spec.model_type == 2:  # BPE: the vocabulary by id, merges ranked by score
        vocab = {piece.piece: i for i, piece in enumerate(pieces)}
    elif proto.trainer_spec.model_type == 1:  # unigram
        vocab = [(piece.piece, piece.score) for piece in pieces]
    else:
        raise CheckpointError(
            f"{path} is a SentencePiece {proto.trainer_spec.model_type} model: transformers "
            f"converts bpe and unigram ones; export without --tokenizer"
        )
    # no BOS or EOS added (no post-processor): the ids preprocess writes for each document
    text = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab).to_str()
    converted = Tokenizer.from_str(text)
    for probe in PROBE_TEXTS:
        ours, theirs = processor.encode(probe), converted.encode(probe).ids
        if ours != theirs:
            raise CheckpointError(
                f"{path} cannot be written as a tokenizer.json with the same ids ({probe!r}: "
                f"SentencePiece {ours}, converted {theirs}), so transformers would tokenize "
                f"differently; export without --tokenizer and encode with the .model"
            )
    return text.encode()


def write(prepared: dict, folder: Path) -> None:
    for name, content in prepared["files"].items():
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            shutil.copy(content, folder / name)


def generation_config(ids: dict) -> dict:
    """What transformers' generate reads: stop at our eos, pad with the pad (or the eos when there is none)."""
    pad = ids["pad_token_id"] if ids["pad_token_id"] is not None else ids["eos_token_id"]
    return {"bos_token_id": ids["bos_token_id"], "eos_token_id": ids["eos_token_id"], "pad_token_id": pad}
