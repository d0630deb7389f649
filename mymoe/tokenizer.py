"""Tokenizers: a SentencePiece ``.model``, or a Hugging Face tokenizer (a ``tokenizer.json`` file, or a model
folder holding one) read with the ``tokenizers`` library, behind SentencePiece's own interface.

    tokenizer = load_tokenizer("data/tok.model")            # sentencepiece.SentencePieceProcessor
    tokenizer = load_tokenizer("Qwen3-30B-A3B/")            # HuggingFaceTokenizer, same methods:
    tokenizer.encode(text), .decode(ids), .vocab_size(), .eos_id(), .bos_id(), .pad_id()  (-1: none)

Every command that takes a tokenizer (data_tools preprocess and inspect, train's data.tokenizer,
generate, export-hf) takes either. A Hugging Face tokenizer encodes as transformers' ``AutoTokenizer``
does for the same folder, special tokens its post-processor adds (a Llama BOS) included, and decodes
without skipping special tokens, as ``AutoTokenizer.decode`` does. Its eos, the end-of-document id
preprocess appends and generation stops at, comes from the folder's tokenizer_config.json (or
special_tokens_map.json, generation_config.json, config.json); a lone tokenizer.json names none, so a
special token with a usual end-of-text name (``</s>``, ``<|endoftext|>``, ...) is taken.

No torch here: the preprocess worker processes import this module and start in a fraction of a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

# special tokens taken for eos / bos / pad when no config file names them, in order of preference
USUAL_NAMES = {
    "eos": ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|end|>"),
    "bos": ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"),
    "pad": ("<pad>", "<|pad|>", "<|padding|>"),
}


class TokenizerError(ValueError):
    """A tokenizer path that cannot be read; the message names the path and the fix."""


def tokenizer_file(path: str | Path) -> Path:
    """The file whose bytes fix the ids: the path itself, or a folder's tokenizer.json / tokenizer.model."""
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return path / name
        raise TokenizerError(
            f"{path} is a folder without tokenizer.json or tokenizer.model: pass a SentencePiece "
            f".model, a tokenizer.json, or a Hugging Face model folder that has one"
        )
    if not path.is_file():
        raise TokenizerError(
            f"tokenizer {path} does not exist; train one with `python -m data_tools "
            f"train-tokenizer`, or pass a SentencePiece .model, a tokenizer.json or a Hugging "
            f"Face model folder"
        )
    return path


def is_huggingface(path: str | Path) -> bool:
    return tokenizer_file(path).suffix == ".json"


def load_tokenizer(path: str | Path):
    """A SentencePieceProcessor or a HuggingFaceTokenizer for `path` (see the module docstring)."""
    file = tokenizer_file(path)
    if file.suffix == ".json":
        return HuggingFaceTokenizer(file)
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_file=str(file))
    except (RuntimeError, OSError) as error:
        raise TokenizerError(
            f"{file} is not a SentencePiece model ({error}); a Hugging Face tokenizer is a tokenizer.json"
        ) from None


class HuggingFaceTokenizer:
    """A tokenizer.json with SentencePieceProcessor's methods (the subset mymoe and data_tools call)."""

    def __init__(self, file: str | Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise TokenizerError(f"reading {file} needs the `tokenizers` library: pip install tokenizers") from None
        self.path = Path(file)
        try:
            self.backend = Tokenizer.from_file(str(self.path))
        except Exception as error:  # the Rust side raises its own exception type
            raise TokenizerError(f"{self.path} is not a Hugging Face tokenizer.json ({error})") from None
        vocab = self.backend.get_vocab(with_added_tokens=True)
        self._size = max(vocab.values()) + 1
        special = {token.content for token in self.backend.get_added_tokens_decoder().values() if token.special}
        named = special_token_names(self.path.parent)
        self._ids = {}
        for role, usual in USUAL_NAMES.items():
            name = named.get(role)
            if name is None:
                name = next((token for token in usual if token in special), None)
            self._ids[role] = vocab.get(name, -1) if name is not None else -1
        if "eos" not in named and eos_id_in_model_config(self.path.parent) is not None:
            self._ids["eos"] = eos_id_in_model_config(self.path.parent)

    def vocab_size(self) -> int:
        return self._size

    def eos_id(self) -> int:
        return self._ids["eos"]

    def bos_id(self) -> int:
        return self._ids["bos"]

    def pad_id(self) -> int:
        return self._ids["pad"]

    def encode(self, text: str | list[str]):
        if isinstance(text, list):
            return [encoding.ids for encoding in self.backend.encode_batch(text)]
        return self.backend.encode(text).ids

    def encode_as_numpy(self, texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
        return [np.array(ids, dtype=np.int32) for ids in self.encode(list(texts))]

    def decode(self, ids) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def id_to_piece(self, token_id: int) -> str:
        return self.backend.id_to_token(token_id)


def special_token_names(folder: Path) -> dict[str, str]:
    """{"eos": "</s>", ...} as the folder's config files name them (the first file that names a role wins)."""
    names: dict[str, str] = {}
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        values = read_json(folder / file)
        for role in USUAL_NAMES:
            token = values.get(f"{role}_token")
            if isinstance(token, dict):
                token = token.get("content")
            if isinstance(token, str):
                names.setdefault(role, token)
    return names


def eos_id_in_model_config(folder: Path) -> Optional[int]:
    """The eos id a model folder names by id only (generation_config.json, config.json), or None."""
    for file in ("generation_config.json", "config.json"):
        eos = read_json(folder / file).get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if isinstance(eos, int):
            return eos
    return None


def read_json(path: Path) -> dict:
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return values if isinstance(values, dict) else {}


def special_ids(tokenizer) -> dict[str, Optional[int]]:
    """{"bos_token_id", "eos_token_id", "pad_token_id"} of either kind of tokenizer (None: it has none)."""
    return {
        f"{role}_token_id": (getattr(tokenizer, f"{role}_id")() if getattr(tokenizer, f"{role}_id")() >= 0 else None)
        for role in ("bos", "eos", "pad")
    }
