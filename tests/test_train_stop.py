"""A signal to one rank stops every rank at the same step boundary, with a checkpoint to resume from."""

import os
import signal
from pathlib import Path

import pytest

from dist_utils import run_distributed
from conftest import TINY_CONFIG, make_dataset, tiny_overrides


def signalled_worker(rank, world_size, train, valid, out_dir, signal_at):
    from mymoe.config import load_config
    from mymoe.train import loop

    original = loop.Trainer.train_step

    def train_step(self):
        if self.step == signal_at and rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # what SLURM sends on preemption
        return original(self)

    loop.Trainer.train_step = train_step
    config = load_config(
        str(TINY_CONFIG),
        tiny_overrides(
            train, valid, Path(out_dir), 20, {"parallel.expert_parallel_size": 2, "train.micro_batch_size": 2}
        ),
    )
    result = loop.run(config, progress=False)
    return result.steps, signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.slow
def test_sigterm_on_one_rank_stops_all_at_one_step_and_saves(tmp_path):
    train, valid = make_dataset(tmp_path / "data")
    results = run_distributed(
        signalled_worker, 2, args=(train, valid, str(tmp_path / "run"), 3), init_process_group=False, timeout=90
    )
    assert [r.value for r in results] == [(4, True), (4, True)]  # both stop after the step the signal hit
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_00000004"
