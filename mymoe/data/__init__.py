"""Training-side reader of Megatron indexed datasets (`.bin/.idx` pairs made by `data_tools`).

    from mymoe.data import build_train_reader

    reader = build_train_reader(
        prefixes=["data/books_train", "data/code_train"],  # .bin/.idx prefixes
        weights=[0.7, 0.3],          # blend; None = by size, as if the prefixes were concatenated
        seq_len=2048,
        micro_batch_size=4,
        dp_rank=dp_rank,             # rank within the data-parallel group
        dp_world_size=dp_world_size,
        seed=1234,                   # same on every rank
        shuffle=True,                # False reads samples in file order (validation)
    )
    input_ids, labels = reader.next_batch()   # LongTensor [4, 2048] each; labels = inputs shifted
    state = reader.state_dict()               # plain ints, floats and lists; equal on all ranks
    reader.load_state_dict(state)             # the next batch is the one that would have followed

Each prefix is read as one token stream (documents concatenated, each ending with its EOD) and cut
into samples of seq_len + 1 tokens with stride seq_len. Per prefix, one epoch visits every sample
once in an order shuffled from (seed, prefix index, epoch); the data-parallel ranks take disjoint
slices of every global batch, so together they see every sample exactly once per epoch. Reading
uses numpy memmap and needs neither megatron-core nor a DataLoader. Details in reader.py.
"""

from mymoe.data.indexed import IndexedTokens, IndexedWriter

__all__ = ["IndexedTokens", "IndexedWriter", "PackedTokenReader", "build_train_reader"]


def __getattr__(name: str):
    if name in ("PackedTokenReader", "build_train_reader"):
        # reader.py imports torch; data_tools reads mymoe.data.indexed (numpy only) and must start without it
        from mymoe.data import reader

        return getattr(reader, name)
    raise AttributeError(f"module 'mymoe.data' has no attribute {name!r}")
