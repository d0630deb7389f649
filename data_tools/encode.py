"""The worker side of preprocessing: texts in, token ids with EOD out.

Kept free of torch and megatron imports so that spawned worker processes start in a fraction of a
second.
"""

import numpy as np

from mymoe.tokenizer import load_tokenizer

_tokenizer = None  # a SentencePieceProcessor or mymoe.tokenizer.HuggingFaceTokenizer
_eod: int = -1
_dtype: type = np.int32
_init_error: str | None = None


def init_worker(model_path: str, eod: int, dtype: type) -> None:
    global _tokenizer, _eod, _dtype, _init_error
    _eod, _dtype = eod, dtype
    try:
        _tokenizer = load_tokenizer(model_path)
    except Exception as error:  # noqa: BLE001
        # A Pool initializer that raises makes the pool start a replacement worker, forever: the
        # run would hang. Keep the error and raise it from the first task, where the parent sees it.
        _init_error = f"worker could not load tokenizer {model_path}: {error}"


def encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens of all kept documents back to back, tokens per document, documents dropped).

    Every kept document ends with EOD, once (a tokenizer whose post-processor already appends its EOS
    gets no second one). A document that tokenizes to nothing is dropped rather than written as a lone
    EOD, which would be an empty document in disguise.
    """
    if _init_error is not None:
        raise RuntimeError(_init_error)
    # num_threads=1: parallelism comes from worker processes, so --workers means what it says.
    encoded = _tokenizer.encode_as_numpy(texts, num_threads=1)  # int32 arrays
    eod = np.array([_eod], dtype=np.int32)
    pieces, lengths = [], []
    for ids in encoded:
        if ids.size and ids[-1] == _eod:
            pieces.append(ids)
            lengths.append(ids.size)
        elif ids.size:
            pieces += [ids, eod]
            lengths.append(ids.size + 1)
    tokens = np.concatenate(pieces).astype(_dtype) if pieces else np.zeros(0, dtype=_dtype)
    return tokens, np.array(lengths, dtype=np.int64), len(texts) - len(lengths)
