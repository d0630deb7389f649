"""mymoe-convert consolidate / to-sharded / reshard: bit-exact round trips, any layout, refusals that
leave nothing behind."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_layout, tiny_config, train_in_process
from mymoe.checkpoint import CheckpointError, read_manifest, resolve_checkpoint
from mymoe.load import load_model
from mymoe.config import config_from_dict
from mymoe.convert.consolidate import consolidate
from mymoe.convert.reshard import write_sharded
from mymoe.convert.state import read_whole_checkpoint


def convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mymoe.convert", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def convert_in_process(capsys, *args: str) -> tuple[int, str]:
    """The CLI without a new interpreter: (exit code, stderr)."""
    from mymoe.convert.cli import main

    code = main([str(arg) for arg in args])
    return code, capsys.readouterr().err


def whole_state(checkpoints: Path) -> dict:
    """Every tensor and run field of a checkpoint, read in one process."""
    directory = resolve_checkpoint(checkpoints)
    manifest = read_manifest(directory)
    state, rng = read_whole_checkpoint(directory, manifest, config_from_dict(manifest["config"]))
    optimizer = state.optimizer.state_dict()
    return {
        "model": state.model.state_dict(),
        "optimizer": optimizer["state"],
        "rng": rng,
        "groups": optimizer["param_groups"],
        "run": {key: manifest[key] for key in ("step", "tokens_seen", "train_reader", "optimizer_state")},
    }


def assert_bit_equal(a, b, where: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_bit_equal(a[key], b[key], f"{where}.{key}")
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


def logits_of(checkpoints: Path) -> torch.Tensor:
    model, _, _ = load_model(checkpoints)
    model.eval()
    with torch.no_grad():
        return model(torch.arange(32).remainder(64).view(2, 16)).logits


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A single-process run saved at step 2, and the same run's losses for steps 3-4."""
    workdir = tmp_path_factory.mktemp("trained")
    train_in_process(workdir, stop_at=2, save_at=(2,))
    reference = tmp_path_factory.mktemp("reference")
    shutil.copytree(workdir, reference, dirs_exist_ok=True)
    _, _, losses = train_in_process(reference, stop_at=4)
    return workdir, losses


def test_sharded_consolidated_sharded_round_trip_is_bit_exact_and_resumes(trained, tmp_path):
    workdir, later_losses = trained
    checkpoints = workdir / "run" / "checkpoints"
    done = convert("consolidate", checkpoints, tmp_path / "model.safetensors")
    assert done.returncode == 0, done.stderr
    assert "consolidating" in done.stderr and done.stdout.startswith("wrote ")
    assert (tmp_path / "model.yaml").exists()
    back = tmp_path / "back" / "run" / "checkpoints"
    done = convert("to-sharded", tmp_path / "model.safetensors", back)
    assert done.returncode == 0, done.stderr
    assert_bit_equal(whole_state(checkpoints), whole_state(back))
    # the trainer resumes from the converted checkpoint exactly where the original run went on
    for suffix in (".bin", ".idx"):
        shutil.copy(workdir / f"data{suffix}", tmp_path / "back" / f"data{suffix}")
    _, _, losses = train_in_process(tmp_path / "back", stop_at=4)
    assert losses == later_losses


def test_weights_only_file_is_not_resumable(trained, tmp_path):
    workdir, _ = trained
    consolidate(workdir / "run" / "checkpoints", tmp_path / "w.safetensors", weights_only=True)
    with pytest.raises(CheckpointError, match="weights only"):
        write_sharded(tmp_path / "w.safetensors", tmp_path / "out", 1, 1)
    assert not (tmp_path / "out").exists()


def test_another_architecture_or_vocabulary_is_refused_and_nothing_written(trained, tmp_path):
    workdir, _ = trained
    consolidate(workdir / "run" / "checkpoints", tmp_path / "m.safetensors")
    other = tiny_config(tmp_path / "other", model={"vocab_size": 96})
    with pytest.raises(CheckpointError, match="vocab_size: checkpoint 64, this run 96"):
        write_sharded(tmp_path / "m.safetensors", tmp_path / "out", 1, 1, run_config=other)
    with pytest.raises(CheckpointError, match="vocab_size"):
        write_sharded(workdir / "run" / "checkpoints", tmp_path / "out", 1, 1, run_config=other)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_shard_is_named_and_nothing_written(trained, tmp_path, capsys):
    workdir, _ = trained
    broken = tmp_path / "broken"
    shutil.copytree(workdir / "run" / "checkpoints", broken)
    shard = next(resolve_checkpoint(broken).glob("*.distcp"))
    shard.unlink()
    code, err = convert_in_process(capsys, "consolidate", broken, tmp_path / "m.safetensors")
    assert code == 1 and shard.name in err and "missing" in err
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "m.yaml").exists()
    done = convert("reshard", broken, tmp_path / "out", "--world_size", "2", "--expert_parallel_size", "2")
    assert done.returncode == 1 and shard.name in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_existing_output_is_refused(trained, tmp_path, capsys):
    workdir, _ = trained
    (tmp_path / "m.safetensors").write_text("keep me")
    code, err = convert_in_process(capsys, "consolidate", workdir / "run" / "checkpoints", tmp_path / "m.safetensors")
    assert code == 1 and "--overwrite" in err
    assert (tmp_path / "m.safetensors").read_text() == "keep me"


@pytest.mark.slow
def test_reshard_ep2_to_1_to_4_keeps_logits_and_state(tmp_path):
    run_layout(tmp_path, world_size=2, expert_parallel_size=2, stop_at=2, save_at=(2,))
    ep2 = tmp_path / "run" / "checkpoints"
    ep1, ep4 = tmp_path / "ep1", tmp_path / "ep4"
    done = convert("reshard", ep2, ep1, "--world_size", "1", "--expert_parallel_size", "1")
    assert done.returncode == 0, done.stderr
    done = convert("reshard", ep1, ep4, "--world_size", "4", "--expert_parallel_size", "4")
    assert done.returncode == 0, done.stderr
    manifest = read_manifest(resolve_checkpoint(ep4))
    assert (manifest["world_size"], manifest["expert_parallel_size"]) == (4, 4)
    assert len(list(resolve_checkpoint(ep4).glob("*.distcp"))) == 4
    assert torch.equal(logits_of(ep2), logits_of(ep1)) and torch.equal(logits_of(ep2), logits_of(ep4))
    a, b = whole_state(ep2), whole_state(ep4)
    for part in ("model", "optimizer", "run"):
        assert_bit_equal(a[part], b[part], part)
    # EP 1 had one rank, so every EP 4 rank starts from that rank's stream, which was rank 0's at EP 2
    assert all(torch.equal(a["rng"]["rng.cpu.rank_0"], b["rng"][f"rng.cpu.rank_{rank}"]) for rank in range(4))
