"""mymoe.data reader: reads Megatron-written files, covers every token once per epoch across
data-parallel ranks, blends by weight, and resumes exactly from its state."""

import json
import warnings

import numpy as np
import pytest
import torch

with warnings.catch_warnings():  # megatron.core warns that Transformer Engine and Apex are absent
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from mymoe.data import IndexedTokens, build_train_reader


def write_megatron(prefix, documents, dtype=np.int32, sentences=False):
    """Write with megatron-core's own builder; `sentences` splits each document in two sequences,
    as Megatron's preprocess_data.py --split-sentences does."""
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in documents:
        doc = np.asarray(doc)
        if sentences and len(doc) > 1:
            half = len(doc) // 2
            builder.add_item(torch.from_numpy(doc[:half]))
            builder.add_item(torch.from_numpy(doc[half:]))
            builder.end_document()
        else:
            builder.add_document(doc, [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def counting_dataset(prefix, num_tokens, start=0, dtype=np.int32):
    """Token i is start + i, cut into documents of uneven lengths."""
    tokens = np.arange(start, start + num_tokens)
    cuts = np.cumsum(np.random.default_rng(0).integers(3, 40, size=num_tokens))
    cuts = cuts[cuts < num_tokens]
    return write_megatron(prefix, np.split(tokens, cuts), dtype=dtype)


def global_samples(prefixes, steps, world_size, batch, **settings):
    """The inputs of the first `steps` global batches, in global order, gathered from all ranks."""
    readers = [
        build_train_reader(prefixes, dp_rank=rank, dp_world_size=world_size, micro_batch_size=batch, **settings)
        for rank in range(world_size)
    ]
    rows = []
    for _ in range(steps):
        for reader in readers:
            inputs, labels = reader.next_batch()
            assert inputs.dtype == labels.dtype == torch.long
            assert inputs.shape == labels.shape == (batch, settings["seq_len"])
            assert torch.equal(inputs[:, 1:], labels[:, :-1])  # labels are inputs shifted by one
            rows += inputs.tolist()
    return rows


@pytest.mark.parametrize("sentences", [False, True])
@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_reads_files_written_by_megatron(tmp_path, dtype, sentences):
    rng = np.random.default_rng(1)
    documents = [rng.integers(0, 60000, size=n) for n in (5, 17, 1, 30, 8)]
    prefix = write_megatron(tmp_path / "meg", documents, dtype=dtype, sentences=sentences)
    ours = IndexedTokens(prefix + ".idx")
    theirs = IndexedDataset(prefix)
    assert ours.dtype == np.dtype(dtype) and ours.num_documents == 5
    assert ours.num_sequences == len(theirs) == (9 if sentences else 5)
    assert [ours.document(i).tolist() for i in range(5)] == [d.tolist() for d in documents]
    np.testing.assert_array_equal(ours.tokens, np.concatenate(documents))

    reader = build_train_reader([prefix], seq_len=10, micro_batch_size=2, shuffle=False)
    inputs, labels = reader.next_batch()
    flat = np.concatenate(documents)
    assert inputs.tolist() == [flat[0:10].tolist(), flat[10:20].tolist()]
    assert labels.tolist() == [flat[1:11].tolist(), flat[11:21].tolist()]


@pytest.mark.parametrize("world_size, batch", [(1, 3), (2, 2), (3, 1)])
def test_every_token_exactly_once_per_epoch_across_ranks(tmp_path, world_size, batch):
    seq_len, num_samples = 8, 60
    prefix = counting_dataset(tmp_path / "count", num_samples * seq_len + 1)
    steps = -(-num_samples // (world_size * batch))  # the epoch may end inside a global batch
    rows = global_samples([prefix], steps, world_size, batch, seq_len=seq_len, seed=7)
    epoch = rows[:num_samples]
    covered = np.sort(np.concatenate(epoch))
    np.testing.assert_array_equal(covered, np.arange(num_samples * seq_len))
    starts = [row[0] for row in epoch]
    assert starts != sorted(starts)  # shuffled
    # The next epoch starts over in another order.
    more = global_samples([prefix], 2 * steps, world_size, batch, seq_len=seq_len, seed=7)
    second = more[num_samples : 2 * num_samples]
    np.testing.assert_array_equal(np.sort(np.concatenate(second)), covered)
    assert [row[0] for row in second] != starts


def test_order_depends_on_seed_only(tmp_path):
    prefix = counting_dataset(tmp_path / "count", 401)
    first = global_samples([prefix], 5, 1, 4, seq_len=10, seed=1)
    assert global_samples([prefix], 5, 1, 4, seq_len=10, seed=1) == first
    assert global_samples([prefix], 5, 1, 4, seq_len=10, seed=2) != first
    # The same global order whatever the data-parallel layout.
    assert global_samples([prefix], 5, 2, 2, seq_len=10, seed=1) == first
    assert global_samples([prefix], 10, 4, 1, seq_len=10, seed=1)[:20] == first


def test_blend_follows_weights_and_each_prefix_covers_its_tokens(tmp_path):
    seq_len = 4
    big = counting_dataset(tmp_path / "big", 300 * seq_len + 1)
    small = counting_dataset(tmp_path / "small", 100 * seq_len + 1, start=100000)
    rows = global_samples([big, small], 100, 1, 4, seq_len=seq_len, weights=[0.75, 0.25], seed=3)
    from_small = [row for row in rows if row[0] >= 100000]
    assert len(from_small) == 100  # 400 samples at 25 %: exactly one pass over `small`
    np.testing.assert_array_equal(np.sort(np.concatenate(from_small)), np.arange(100000, 100000 + 100 * seq_len))
    for prefix_count in range(1, 401):  # the greedy blend never drifts by a whole sample
        taken = sum(row[0] >= 100000 for row in rows[:prefix_count])
        assert abs(taken - 0.25 * prefix_count) < 1

    reader = build_train_reader([big, small], None, seq_len=seq_len)  # by size: 3 to 1
    assert reader.weights == pytest.approx([0.75, 0.25])


def test_resume_gives_exactly_the_batches_that_would_have_followed(tmp_path):
    a = counting_dataset(tmp_path / "a", 203)
    b = counting_dataset(tmp_path / "b", 157, start=10000)
    settings = dict(weights=[2.0, 1.0], seq_len=6, micro_batch_size=2, seed=11)
    for rank in range(2):
        straight = build_train_reader([a, b], dp_rank=rank, dp_world_size=2, **settings)
        for _ in range(23):  # past the end of an epoch of both prefixes
            straight.next_batch()
        state = json.loads(json.dumps(straight.state_dict()))  # plain data, survives any format
        resumed = build_train_reader([a, b], dp_rank=rank, dp_world_size=2, **settings)
        resumed.load_state_dict(state)
        for _ in range(15):
            expected, actual = straight.next_batch(), resumed.next_batch()
            assert torch.equal(expected[0], actual[0]) and torch.equal(expected[1], actual[1])
        assert resumed.state_dict() == straight.state_dict()


def test_resume_on_another_data_parallel_layout(tmp_path):
    prefix = counting_dataset(tmp_path / "a", 301)
    two_ranks = [
        build_train_reader([prefix], seq_len=5, micro_batch_size=2, dp_rank=r, dp_world_size=2, seed=4)
        for r in range(2)
    ]
    for _ in range(7):
        for reader in two_ranks:
            reader.next_batch()
    one_rank = build_train_reader([prefix], seq_len=5, micro_batch_size=4, seed=4)
    one_rank.load_state_dict(two_ranks[0].state_dict())
    inputs, _ = one_rank.next_batch()
    expected = torch.cat([reader.next_batch()[0] for reader in two_ranks])
    assert torch.equal(inputs, expected)


def test_state_from_other_data_or_settings_is_refused(tmp_path):
    prefix = counting_dataset(tmp_path / "a", 301)
    other = counting_dataset(tmp_path / "b", 501)
    state = build_train_reader([prefix], seq_len=5, seed=4).state_dict()
    with pytest.raises(ValueError, match="saved with seed=4 but this reader has seed=5"):
        build_train_reader([prefix], seq_len=5, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match=r"saved with num_samples=\[60\]"):
        build_train_reader([other], seq_len=5, seed=4).load_state_dict(state)


def test_bad_reader_arguments_name_the_fix(tmp_path):
    prefix = counting_dataset(tmp_path / "a", 50)
    with pytest.raises(ValueError, match=r"50 tokens, fewer than seq_len \+ 1 = 65.*lower seq_len"):
        build_train_reader([prefix], seq_len=64)
    with pytest.raises(ValueError, match="1 weights for 2 prefixes"):
        build_train_reader([prefix, prefix], [1.0], seq_len=4)
    with pytest.raises(ValueError, match=r"dp_rank=2 must be in \[0, dp_world_size=2\)"):
        build_train_reader([prefix], seq_len=4, dp_rank=2, dp_world_size=2)
    with pytest.raises(FileNotFoundError, match=r"missing\.idx does not exist"):
        build_train_reader([str(tmp_path / "missing")], seq_len=4)
    (tmp_path / "a.bin").write_bytes(b"\x00" * 6)
    with pytest.raises(ValueError, match="does not belong together or a write was interrupted"):
        build_train_reader([prefix], seq_len=4)
