"""`merge`: append `.bin/.idx` pairs into one, in the order given.

    python -m data_tools merge --output data/all data/part1 data/part2 'data/shards/*.idx'

Shards made by us or by Megatron-LM's tools/preprocess_data.py merge alike (megatron-core's
IndexedDatasetBuilder.add_index does the work). All shards must share one token dtype: appending
uint16 ids to an int32 file would need a rewrite of every token, which is not a merge.
"""

import glob
import os
import shutil
import time
from dataclasses import dataclass

from tqdm import tqdm

from data_tools import DataError
from data_tools.indexed_io import (
    check_output_free,
    make_staging_folder,
    pair_paths,
    publish_pair,
)
from mymoe.data.indexed import IndexedTokens, IndexedWriter, strip_suffix


@dataclass
class MergeResult:
    output: str
    shards: int
    documents: int
    tokens: int
    dtype: str
    seconds: float

    def summary(self) -> str:
        return (
            f"wrote {self.output}.{{bin,idx}}: {self.documents:,} documents, {self.tokens:,} "
            f"tokens ({self.dtype}) from {self.shards} shards in {self.seconds:.1f} s"
        )


def resolve_shards(specs: list[str]) -> list[str]:
    """Prefixes from `data/part1`, `data/part1.bin`, `data/part1.idx` or a glob of any of them."""
    prefixes = []
    for spec in specs:
        matches = sorted(glob.glob(spec)) if glob.has_magic(spec) else [spec]
        if not matches:
            raise DataError(f"shard pattern {spec!r} matches nothing; check the pattern")
        for match in matches:
            prefix = strip_suffix(match)
            if prefix not in prefixes:  # a glob of *.* finds each pair twice
                prefixes.append(prefix)
    if not prefixes:
        raise DataError("no shards given; pass the prefixes of the .bin/.idx pairs to merge")
    return prefixes


def merge(
    shard_specs: list[str], output: str, overwrite: bool = False, progress: bool = True, announce=print
) -> MergeResult:
    started = time.perf_counter()
    prefixes = resolve_shards(shard_specs)
    shards = []
    for prefix in prefixes:
        if os.path.abspath(prefix) == os.path.abspath(output):
            raise DataError(f"--output {output} is also a shard to merge; choose another --output")
        try:
            shards.append(IndexedTokens(prefix))
        except (FileNotFoundError, ValueError) as error:
            raise DataError(f"cannot merge shard {prefix}: {error}") from None
    dtypes = {shard.dtype.name for shard in shards}
    if len(dtypes) > 1:
        listing = ", ".join(f"{s.prefix} ({s.dtype.name})" for s in shards)
        raise DataError(
            f"shards have different token dtypes: {listing}; re-run preprocess for the odd ones "
            f"with --dtype set to the others' dtype (int32 holds any vocabulary)"
        )
    check_output_free([output], overwrite)
    documents = sum(s.num_documents for s in shards)
    tokens = sum(s.num_tokens for s in shards)
    dtype = shards[0].dtype
    announce(
        f"merge: {len(shards)} shards ({documents:,} documents, {tokens:,} tokens, {dtype.name}) "
        f"-> {output}.{{bin,idx}}"
    )
    del shards  # release the memory maps; add_index reopens each shard
    staging = make_staging_folder(output)
    try:
        staged = os.path.join(staging, "merged")
        builder = IndexedWriter(pair_paths(staged)[0], dtype=dtype.type)
        for prefix in tqdm(prefixes, desc="merging", unit="shard", disable=not progress):
            builder.add_index(prefix)
        builder.finalize(pair_paths(staged)[1])
        publish_pair(staged, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return MergeResult(output, len(prefixes), documents, tokens, dtype.name, time.perf_counter() - started)
