"""Packed, blended, shuffled, data-parallel sharded samples over indexed datasets.

Every dataset (prefix) is one token stream: its documents back to back, each ending with its EOD.
The stream is cut into samples of seq_len + 1 tokens with stride seq_len, so sample k of a prefix
covers tokens [k * seq_len, (k + 1) * seq_len + 1): the inputs of consecutive samples tile the
stream, and the extra token is the label of the last input. The tail shorter than seq_len + 1 is
dropped.

All ranks walk the same global sequence of samples; rank r of a data-parallel world of size W takes
positions [r * B, (r + 1) * B) of every global batch of W * B samples. Global sample g is drawn from
the prefix whose share is furthest behind its weight (largest weight * (g + 1) - taken so far; the
same greedy rule as Megatron's BlendedDataset), then from that prefix's current epoch, a permutation
of its samples seeded by (seed, prefix index, epoch). So the whole order is a function of the seed
and two counters, which is all `state_dict()` has to remember.
"""

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from mymoe.data.indexed import IndexedTokens


class PackedTokenReader:
    def __init__(
        self,
        prefixes: Sequence[str],
        weights: Sequence[float] | None,
        seq_len: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        seed: int = 1234,
        shuffle: bool = True,
    ):
        if isinstance(prefixes, str):
            prefixes = [prefixes]
        _check_arguments(prefixes, weights, seq_len, micro_batch_size, dp_rank, dp_world_size)
        self.prefixes = list(prefixes)
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.seed = seed
        self.shuffle = shuffle

        self.datasets = [IndexedTokens(prefix) for prefix in self.prefixes]
        self.num_samples = [max(d.num_tokens - 1, 0) // seq_len for d in self.datasets]
        for prefix, dataset, samples in zip(self.prefixes, self.datasets, self.num_samples):
            if samples == 0:
                raise ValueError(
                    f"{prefix} has {dataset.num_tokens} tokens, fewer than seq_len + 1 = "
                    f"{seq_len + 1}, so it yields no sample; lower seq_len or add data"
                )
        if weights is None:
            # Without weights, blend as if the prefixes were concatenated.
            weights = self.num_samples
        total = float(sum(weights))
        self.weights = [float(w) / total for w in weights]

        self.next_sample = 0  # position in the global sample sequence, the same on every rank
        self.consumed = [0] * len(self.datasets)  # samples taken from each prefix, by all ranks
        self._permutations: dict[int, tuple[int, np.ndarray]] = {}

    @property
    def epochs(self) -> list[float]:
        """Passes made over each prefix so far (1.0 = every sample of it seen once)."""
        return [c / n for c, n in zip(self.consumed, self.num_samples)]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next micro-batch: (input_ids, labels), both LongTensor [B, seq_len]."""
        first_mine = self.dp_rank * self.micro_batch_size
        windows = []
        for position in range(self.micro_batch_size * self.dp_world_size):
            # Every rank advances through the whole global batch so that the counters stay equal
            # on all ranks; only its own slice is read from disk.
            dataset_index, sample_index = self._advance()
            if first_mine <= position < first_mine + self.micro_batch_size:
                windows.append(self._window(dataset_index, sample_index))
        return inputs_and_labels(windows)

    def state_dict(self) -> dict:
        return {
            "next_sample": self.next_sample,
            "consumed": list(self.consumed),
            "seed": self.seed,
            "seq_len": self.seq_len,
            "shuffle": self.shuffle,
            "num_samples": list(self.num_samples),
            "weights": list(self.weights),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume after the last batch taken before `state_dict()`.

        The data-parallel size and micro-batch size may differ from the saving run: the counters
        are positions in the global sample sequence, which does not depend on either.
        """
        for key in ("seed", "seq_len", "shuffle", "num_samples"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"reader state was saved with {key}={state[key]} but this reader has "
                    f"{key}={getattr(self, key)}; resume with the same data and settings, or "
                    f"start a fresh reader"
                )
        if not np.allclose(state["weights"], self.weights):
            raise ValueError(
                f"reader state was saved with blend weights {state['weights']} but this reader "
                f"has {self.weights}; resume with the same weights, or start a fresh reader"
            )
        self.next_sample = int(state["next_sample"])
        self.consumed = [int(c) for c in state["consumed"]]

    def _advance(self) -> tuple[int, int]:
        """Pick global sample `next_sample`: (prefix index, sample index within the prefix)."""
        g = self.next_sample
        lag = [w * (g + 1) - c for w, c in zip(self.weights, self.consumed)]
        dataset_index = int(np.argmax(lag))
        epoch, position = divmod(self.consumed[dataset_index], self.num_samples[dataset_index])
        sample_index = int(self._permutation(dataset_index, epoch)[position])
        self.consumed[dataset_index] += 1
        self.next_sample += 1
        return dataset_index, sample_index

    def _permutation(self, dataset_index: int, epoch: int) -> np.ndarray:
        cached = self._permutations.get(dataset_index)
        if cached is None or cached[0] != epoch:
            count = self.num_samples[dataset_index]
            if self.shuffle:
                rng = np.random.default_rng([self.seed, dataset_index, epoch])
                order = rng.permutation(count)
            else:
                order = np.arange(count)
            cached = (epoch, order)
            self._permutations[dataset_index] = cached
        return cached[1]

    def _window(self, dataset_index: int, sample_index: int) -> np.ndarray:
        start = sample_index * self.seq_len
        tokens = self.datasets[dataset_index].tokens[start : start + self.seq_len + 1]
        return tokens.astype(np.int64)


class FileOrderBatches:
    """Every sample of one prefix once, in file order, batch_size at a time; the last batch holds the rest.
    File order is how the held-out split is read (shuffle=False), so the first eval_steps batches of a
    prefix are the trainer's evaluation batches when it is the only validation prefix."""

    def __init__(self, prefix: str, seq_len: int, batch_size: int):
        self.reader = PackedTokenReader([prefix], None, seq_len, batch_size, shuffle=False)
        self.num_samples = self.reader.num_samples[0]
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        full_batches = self.num_samples // self.batch_size
        for _ in range(full_batches):
            yield self.reader.next_batch()
        rest = range(full_batches * self.batch_size, self.num_samples)
        if rest:
            yield inputs_and_labels([self.reader._window(0, sample_index) for sample_index in rest])

    def label_tokens(self, samples: int) -> np.ndarray:
        """The labels of the first `samples` samples, in order: one slice of the stream, which they tile."""
        return self.reader.datasets[0].tokens[1 : samples * self.reader.seq_len + 1]


def inputs_and_labels(windows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of seq_len + 1 tokens -> (input_ids, shift_labels): window[:-1] and window[1:], LongTensor
    [B, seq_len] each; the model takes the second as shift_labels= (already shifted)."""
    batch = torch.from_numpy(np.stack(windows))  # [B, seq_len + 1]
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


def build_train_reader(
    prefixes: Sequence[str] | str,
    weights: Sequence[float] | None = None,
    seq_len: int = 2048,
    micro_batch_size: int = 1,
    dp_rank: int = 0,
    dp_world_size: int = 1,
    seed: int = 1234,
    shuffle: bool = True,
) -> PackedTokenReader:
    """See the module docstring of `mymoe.data` for the contract."""
    return PackedTokenReader(prefixes, weights, seq_len, micro_batch_size, dp_rank, dp_world_size, seed, shuffle)


def _check_arguments(prefixes, weights, seq_len, micro_batch_size, dp_rank, dp_world_size):
    if not prefixes:
        raise ValueError("prefixes is empty; pass at least one .bin/.idx prefix")
    if weights is not None:
        if len(weights) != len(prefixes):
            raise ValueError(
                f"{len(weights)} weights for {len(prefixes)} prefixes; give one weight per "
                f"prefix, or weights=None to blend by size"
            )
        if any(not w > 0 for w in weights):
            raise ValueError(f"weights={list(weights)} must all be > 0; drop a prefix instead")
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1")
    if dp_world_size < 1 or not 0 <= dp_rank < dp_world_size:
        raise ValueError(
            f"dp_rank={dp_rank} must be in [0, dp_world_size={dp_world_size}); pass the rank "
            f"within the data-parallel group, not the global rank"
        )
