"""Writing `.bin/.idx` pairs: the token dtype, staging, and never a half-written pair.

The bytes are written by mymoe.data.indexed.IndexedWriter, identical to megatron-core's builder.

Every pair is written under a hidden staging folder next to the output and renamed into place at the
end, `.idx` last: an interrupted run leaves at most the staging folder (or a `.bin` without its
`.idx`), never a pair that looks complete.
"""

import os
import shutil

import numpy as np

from data_tools import DataError

UINT16_LIMIT = 65536  # token ids 0..65535 fit in uint16


def choose_dtype(vocab_size: int, requested: str = "auto") -> type:
    """The .bin dtype: uint16 while the vocabulary fits (megatron's DType.optimal_dtype rule)."""
    if requested == "auto":
        # Same threshold as megatron.core's DType.optimal_dtype, so files match Megatron's own.
        return np.uint16 if vocab_size < 65500 else np.int32
    if requested == "uint16":
        if vocab_size > UINT16_LIMIT:
            raise DataError(
                f"--dtype uint16 cannot hold token ids up to {vocab_size - 1} "
                f"(vocab_size={vocab_size}); use --dtype int32 or --dtype auto"
            )
        return np.uint16
    if requested == "int32":
        return np.int32
    raise DataError(f"--dtype {requested!r} is not one of auto, uint16, int32")


def pair_paths(prefix: str) -> tuple[str, str]:
    return prefix + ".bin", prefix + ".idx"


def check_output_free(prefixes: list[str], overwrite: bool) -> None:
    """Refuse to replace an existing pair unless asked; make the output folder."""
    for prefix in prefixes:
        for path in pair_paths(prefix):
            if os.path.exists(path) and not overwrite:
                raise DataError(f"{path} already exists; pass --overwrite to replace it, or choose another --output")
            if os.path.isdir(path):
                raise DataError(f"{path} is a directory; choose another --output")
        folder = os.path.dirname(os.path.abspath(prefix))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as error:
            raise DataError(f"cannot create output folder {folder}: {error}") from None


def make_staging_folder(final_prefix: str) -> str:
    folder, name = os.path.split(os.path.abspath(final_prefix))
    staging = os.path.join(folder, f".{name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    return staging


def publish_pair(staged_prefix: str, final_prefix: str) -> None:
    staged_bin, staged_idx = pair_paths(staged_prefix)
    final_bin, final_idx = pair_paths(final_prefix)
    # The old .idx goes first, so that no moment pairs a new .bin with an old .idx.
    if os.path.exists(final_idx):
        os.remove(final_idx)
    os.replace(staged_bin, final_bin)
    os.replace(staged_idx, final_idx)


def write_documents(builder, tokens: np.ndarray, lengths: np.ndarray) -> None:
    """Add documents stored back to back in `tokens`, one sequence per document (as Megatron's
    preprocess_data.py does without --split-sentences)."""
    builder.add_documents(tokens, lengths)
