"""Sharded checkpoints: exact resume, resharding across expert-parallel and world sizes, atomic commit,
corruption and unsafe-pickle refusal, architecture checks, keep-last and async save.

The fast tests train a tiny model in this process; the slow ones spawn gloo ranks (tests/dist_utils.py)
or torchrun. Every run trains a 2-layer, 4-expert model on a few thousand random tokens.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_layout, tiny_config, train_in_process
from dist_utils import run_distributed
from mymoe.checkpoint import CheckpointError, architecture_differences, expert_checksums, resolve_checkpoint
from mymoe.load import load_model
from mymoe.config import config_from_dict


# ---------------------------------------------------------------------------------------------------
# helpers (module level, so spawned ranks can import them)


def parameter_crcs(model) -> dict[str, int]:
    return {
        name: zlib.crc32(p.detach().contiguous().view(-1).view(torch.uint8).numpy())
        for name, p in model.state_dict().items()
    }


def copy_checkpoint(source_workdir: Path, target_workdir: Path, step: int) -> None:
    """A fresh run folder whose only checkpoint is `step` of the source run."""
    name = f"step_{step:08d}"
    target = target_workdir / "run" / "checkpoints"
    target.mkdir(parents=True)
    shutil.copytree(source_workdir / "run" / "checkpoints" / name, target / name)
    (target / "latest").write_text(name + "\n")
    for suffix in (".bin", ".idx"):
        shutil.copy(source_workdir / f"data{suffix}", target_workdir / f"data{suffix}")


def read_all_tensors(directory: Path) -> dict:
    """Every tensor of a checkpoint, whole, by key (a test's view; training reads only its share)."""
    import torch.distributed.checkpoint as dcp
    from mymoe.checkpoint.manager import saved_tensor_keys
    from mymoe.checkpoint.storage import SafeFileSystemReader, TensorsOnlyLoadPlanner

    tensors = {key: torch.empty(shape, dtype=dtype) for key, (shape, dtype) in saved_tensor_keys(directory).items()}
    dcp.load(tensors, storage_reader=SafeFileSystemReader(directory), planner=TensorsOnlyLoadPlanner(), no_dist=True)
    return tensors


def rewrite_manifest_entry(directory: Path, name: str) -> None:
    """Record a tampered file's real size and crc, so only the loader's own defences stand in the way."""
    manifest = json.loads((directory / "manifest.json").read_text())
    data = (directory / name).read_bytes()
    manifest["files"][name] = {"bytes": len(data), "crc32": zlib.crc32(data)}
    (directory / "manifest.json").write_text(json.dumps(manifest))


class RunsCode:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---------------------------------------------------------------------------------------------------
# fast: one process


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A single-process run saved at step 3 (and 6); returns its workdir."""
    workdir = tmp_path_factory.mktemp("saved_run")
    train_in_process(workdir, stop_at=6, save_at=(3, 6))
    return workdir


def fresh_copy(saved_run: Path, tmp_path: Path, step: int = 3) -> Path:
    copy_checkpoint(saved_run, tmp_path, step)
    return tmp_path / "run" / "checkpoints" / f"step_{step:08d}"


def test_resume_in_process_is_bit_exact_with_router_noise(tmp_path):
    """2N steps == N steps, stop, resume, N more: losses, parameters and data position, with router noise
    so the RNG state must come back too."""
    noisy = dict(moe={"router_noise_std": 0.5, "router_jitter_noise": 0.1})
    straight, _, straight_losses = train_in_process(tmp_path / "a", 6, config=tiny_config(tmp_path / "a", **noisy))
    config = tiny_config(tmp_path / "b", **noisy)
    train_in_process(tmp_path / "b", 3, save_at=(3,), config=config)
    resumed, _, resumed_losses = train_in_process(tmp_path / "b", 6, config=config)
    assert resumed_losses == straight_losses[3:]
    assert parameter_crcs(resumed.model) == parameter_crcs(straight.model)
    assert resumed.train_reader.state_dict() == straight.train_reader.state_dict()
    assert resumed.optimizer.state_dict()["state"][0]["step"] == straight.optimizer.state_dict()["state"][0]["step"]


def test_flipped_byte_is_caught_and_names_the_file(saved_run, tmp_path):
    directory = fresh_copy(saved_run, tmp_path)
    shard = directory / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp fails its checksum"):
        load_model(directory)
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp fails its checksum"):
        train_in_process(tmp_path, 4)


def test_truncated_and_missing_shards_are_named(saved_run, tmp_path):
    directory = fresh_copy(saved_run, tmp_path)
    shard = directory / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp is 1000 bytes but was saved with"):
        load_model(directory)
    shard.unlink()
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp is missing"):
        load_model(directory)


def test_checksums_taken_while_writing_match_the_bytes_on_disk(saved_run):
    """Each file's crc32 and each record's (taken from the bytes as they were written, never read back)
    are those of what lies on disk, and every record DCP's index lists has one."""
    from mymoe.checkpoint.storage import read_dcp_metadata

    directory = saved_run / "run" / "checkpoints" / "step_00000003"
    manifest = json.loads((directory / "manifest.json").read_text())
    storage = read_dcp_metadata(directory).storage_data.values()
    for name in [name for name in manifest["files"] if name.endswith(".distcp")]:
        data = (directory / name).read_bytes()
        assert manifest["files"][name] == {"bytes": len(data), "crc32": zlib.crc32(data)}
        records = {str(info.offset): zlib.crc32(data[info.offset : info.offset + info.length]) for info in storage}
        assert manifest["record_crc32"][name] == records


def _flip_in_largest_record(directory: Path) -> None:
    """One bit in the middle of the largest record: inside a tensor's bytes."""
    from mymoe.checkpoint.storage import read_dcp_metadata

    info = max(read_dcp_metadata(directory).storage_data.values(), key=lambda info: info.length)
    _flip(directory / info.relative_path, info.offset + info.length // 2)


def _flip_in_first_records_directory(directory: Path) -> None:
    """One bit in the zip directory at the end of the file's first record (torch.save's record layout)."""
    from mymoe.checkpoint.storage import read_dcp_metadata

    info = min(read_dcp_metadata(directory).storage_data.values(), key=lambda info: info.offset)
    _flip(directory / info.relative_path, info.offset + info.length - 10)


def _flip(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x04
    path.write_bytes(bytes(data))


def _truncate_shard(directory: Path) -> None:
    shard = directory / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def live_state(trainer) -> dict:
    optimizer = {
        (index, key): zlib.crc32(value.contiguous().view(-1).view(torch.uint8).numpy())
        for index, state in trainer.optimizer.state_dict()["state"].items()
        for key, value in state.items()
        if torch.is_tensor(value)
    }
    return {
        "step": trainer.step,
        "parameters": parameter_crcs(trainer.model),
        "optimizer": optimizer,
        "reader": trainer.train_reader.state_dict(),
    }


@pytest.mark.parametrize(
    "damage, refusal",
    [
        (_flip_in_largest_record, r"__0_0\.distcp fails its checksum in the record of '[^']+' \(bytes \d+-\d+: crc32"),
        (_flip_in_first_records_directory, r"__0_0\.distcp fails its checksum in the record of"),
        (_truncate_shard, r"__0_0\.distcp is \d+ bytes but was saved with \d+ \(truncated"),
    ],
    ids=["bit-flip-in-tensor-bytes", "bit-flip-in-record-directory", "truncated"],
)
def test_a_damaged_shard_is_refused_at_resume_and_the_live_state_is_untouched(saved_run, tmp_path, damage, refusal):
    """The checkpoint is read into fresh tensors and checked as it is read; only a wholly verified one
    reaches the running model, so a refusal leaves its weights, moments, step and data position as they were."""
    directory = fresh_copy(saved_run, tmp_path)
    trainer, manager, _ = train_in_process(tmp_path, 4)  # resumes from step 3, then moves on to step 4
    before = live_state(trainer)
    damage(directory)
    with pytest.raises(CheckpointError, match=refusal) as error:
        manager.load(trainer, directory)
    assert "nothing was loaded" in str(error.value) or "truncated" in str(error.value)
    assert live_state(trainer) == before


def test_pickled_code_in_the_index_is_refused(saved_run, tmp_path):
    directory = fresh_copy(saved_run, tmp_path)
    marker = tmp_path / "code_ran"
    (directory / ".metadata").write_bytes(pickle.dumps(RunsCode(str(marker))))
    rewrite_manifest_entry(directory, ".metadata")
    with pytest.raises(CheckpointError, match=r"refusing to load global '(builtins|io)\.open'"):
        load_model(directory)
    assert not marker.exists()


@pytest.mark.parametrize(
    "record_sums, refusal",
    [
        (True, r"(?s)__0_0\.distcp: the record of 'model\.model\.embed_tokens\.weight' .* is not one saved tensor"),
        (False, r"(?s)reading tensors from .* failed.*Weights only load failed"),
    ],
    ids=["read-by-mymoe-never-unpickled", "saved-before-record-sums-torch-load-weights-only"],
)
def test_pickled_code_in_a_shard_is_refused(saved_run, tmp_path, record_sums, refusal):
    """A tensor entry pointed at a pickle that would run code, its checksums rewritten to match: mymoe's
    reader never unpickles a record and refuses one that is not a single tensor; a checkpoint without
    record sums goes through DCP's reader, where torch.load(weights_only=True) refuses it."""
    from mymoe.checkpoint.storage import read_dcp_metadata

    directory = fresh_copy(saved_run, tmp_path)
    marker = tmp_path / "code_ran"
    payload = io.BytesIO()
    torch.save({"weights": RunsCode(str(marker))}, payload)
    shard = directory / "__0_0.distcp"
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(payload.getvalue())
    metadata = read_dcp_metadata(directory)
    index = next(i for i in metadata.storage_data if i.fqn.startswith("model.model.embed_tokens"))
    metadata.storage_data[index] = dataclasses.replace(
        metadata.storage_data[index], offset=offset, length=len(payload.getvalue())
    )
    (directory / ".metadata").write_bytes(pickle.dumps(metadata))
    rewrite_manifest_entry(directory, ".metadata")
    rewrite_manifest_entry(directory, "__0_0.distcp")
    manifest = json.loads((directory / "manifest.json").read_text())
    if record_sums:
        manifest["record_crc32"]["__0_0.distcp"][str(offset)] = zlib.crc32(payload.getvalue())
    else:
        del manifest["record_crc32"]
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=refusal):
        load_model(directory)
    assert not marker.exists()


def test_other_architecture_or_vocabulary_is_refused_with_the_difference(saved_run, tmp_path):
    fresh_copy(saved_run, tmp_path)
    config = tiny_config(tmp_path, model={"vocab_size": 96}, moe={"n_routed_experts": 8})
    with pytest.raises(CheckpointError) as error:
        train_in_process(tmp_path, 4, config=config)
    assert "model.vocab_size: checkpoint 64, this run 96" in str(error.value)
    assert "model.moe.n_routed_experts: checkpoint 4, this run 8" in str(error.value)


MLA = {"attention_type": "mla", "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8}


@pytest.mark.parametrize(
    "model,named",
    [
        (MLA, "model.attention_type: checkpoint 'gqa', this run 'mla'"),
        ({"num_nextn_predict_layers": 1}, "model.num_nextn_predict_layers: checkpoint 0, this run 1"),
    ],
)
def test_a_checkpoint_of_another_attention_type_or_prediction_depth_is_refused_at_resume(
    saved_run, tmp_path, model, named
):
    fresh_copy(saved_run, tmp_path)
    with pytest.raises(CheckpointError) as error:
        train_in_process(tmp_path, 4, config=tiny_config(tmp_path, model=model))
    assert named in str(error.value)


def test_latent_attention_sizes_count_only_under_latent_attention():
    saved = {**tiny_config_dict(), **MLA}
    assert architecture_differences(saved, {**saved, "kv_lora_rank": 16}) == [
        "model.kv_lora_rank: checkpoint 8, this run 16"
    ]
    plain = tiny_config_dict()
    assert architecture_differences(plain, {**plain, "kv_lora_rank": 16}) == []  # unused by grouped-query attention


def tiny_config_dict() -> dict:
    return config_from_dict({"model": {"vocab_size": 64}}).to_dict()["model"]


def test_noise_and_capacity_may_change_between_runs(saved_run, tmp_path):
    fresh_copy(saved_run, tmp_path)
    config = tiny_config(tmp_path, max_steps=4, moe={"router_noise_std": 0.1, "capacity_factor": 2.0})
    trainer, _, losses = train_in_process(tmp_path, 4, config=config)
    assert trainer.step == 4 and len(losses) == 1


def test_keep_last_and_latest(tmp_path):
    config = tiny_config(tmp_path, train={"keep_last": 2})
    train_in_process(tmp_path, 5, save_at=(1, 2, 3, 4, 5), config=config)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004", "step_00000005"]
    assert resolve_checkpoint(root) == root / "step_00000005"
    (root / "latest").unlink()  # lost pointer: the newest committed folder is still found
    assert resolve_checkpoint(root) == root / "step_00000005"


def test_async_save_writes_the_same_state_as_a_sync_save(tmp_path):
    train_in_process(tmp_path / "sync", 4, save_at=(2,))
    config = tiny_config(tmp_path / "async", train={"async_save": True})
    train_in_process(tmp_path / "async", 4, save_at=(2,), config=config)  # trains on while step 2 is written

    def manifest(workdir):
        return json.loads((workdir / "run" / "checkpoints" / "step_00000002" / "manifest.json").read_text())

    sync, background = manifest(tmp_path / "sync"), manifest(tmp_path / "async")
    assert sync["expert_checksums"] == background["expert_checksums"]
    assert sync["files"]["__0_0.distcp"] == background["files"]["__0_0.distcp"]


def test_load_model_holds_every_expert_of_an_in_process_run(saved_run):
    model, config, manifest = load_model(saved_run / "run" / "checkpoints", step=3)
    assert manifest["step"] == 3 and config.model.vocab_size == 64
    assert {name: {e: True for e in sums} for name, sums in expert_checksums(model).items()} == {
        name: {e: sums[e] == manifest["expert_checksums"][name][e] for e in sums}
        for name, sums in expert_checksums(model).items()
    }


# ---------------------------------------------------------------------------------------------------
# slow: spawned gloo ranks


def crash_worker(rank, world_size, workdir):
    """Save step 2, then die by SIGKILL half-way through writing step 3's shard."""
    import mymoe.checkpoint.checksummed as checksummed

    train_in_process(workdir, 2, save_at=(2,))

    def write_then_die(stream, tensor):
        stream.write(b"\0" * 100)
        stream.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    checksummed.write_record = write_then_die
    train_in_process(workdir, 3, save_at=(3,))


@pytest.mark.slow
def test_save_killed_half_way_leaves_latest_loadable(tmp_path):
    results = run_distributed(
        crash_worker, 1, args=(str(tmp_path),), init_process_group=False, timeout=60, raise_errors=False
    )
    assert results[0].exitcode == -signal.SIGKILL
    root = tmp_path / "run" / "checkpoints"
    assert (root / "step_00000003.partial").is_dir() and not (root / "step_00000003").exists()
    assert (root / "latest").read_text().strip() == "step_00000002"
    model, _, manifest = load_model(root)
    assert manifest["step"] == 2
    trainer, _, _ = train_in_process(tmp_path, 4, save_at=(4,))  # resumes from 2; the next save clears the debris
    assert trainer.step == 4 and not (root / "step_00000003.partial").exists()


@pytest.fixture(scope="module")
def ep2_reference(tmp_path_factory):
    """EP=2 on 2 ranks: 6 steps, saved at 3 and 6; the losses of steps 4-6 are the reference."""
    workdir = tmp_path_factory.mktemp("ep2_reference")
    results = run_layout(workdir, world_size=2, expert_parallel_size=2, stop_at=6, save_at=(3, 6))
    return workdir, results[0]["losses"]


@pytest.mark.slow
def test_resume_on_two_ranks_is_bit_exact(ep2_reference, tmp_path):
    """N steps + stop + resume for N more == 2N straight: losses, every saved tensor (parameters, AdamW
    moments, RNG) and the data position, at EP=2 on 2 ranks."""
    reference_dir, reference_losses = ep2_reference
    copy_checkpoint(reference_dir, tmp_path, step=3)
    results = run_layout(tmp_path, world_size=2, expert_parallel_size=2, stop_at=6, save_at=(6,))
    assert results[0]["losses"] == reference_losses[3:]

    def manifest(workdir):
        return json.loads((workdir / "run" / "checkpoints" / "step_00000006" / "manifest.json").read_text())

    straight, resumed = manifest(reference_dir), manifest(tmp_path)
    assert resumed["train_reader"] == straight["train_reader"]
    assert resumed["expert_checksums"] == straight["expert_checksums"]
    straight_tensors, resumed_tensors = (
        read_all_tensors(workdir / "run" / "checkpoints" / "step_00000006") for workdir in (reference_dir, tmp_path)
    )
    assert straight_tensors.keys() == resumed_tensors.keys()
    for key, value in straight_tensors.items():
        assert torch.equal(value, resumed_tensors[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("world_size, expert_parallel_size", [(1, 1), (4, 4)])
def test_resume_at_another_world_and_expert_parallel_size(ep2_reference, tmp_path, world_size, expert_parallel_size):
    reference_dir, reference_losses = ep2_reference
    copy_checkpoint(reference_dir, tmp_path, step=3)
    results = run_layout(tmp_path, world_size, expert_parallel_size, stop_at=6)
    np.testing.assert_allclose(results[0]["losses"], reference_losses[3:], rtol=0, atol=1e-6)
    experts_per_rank = 4 // expert_parallel_size
    for rank, result in enumerate(results):
        # every rank holds exactly its experts, each equal to the one saved
        expected = [
            str(e)
            for e in range(
                rank % expert_parallel_size * experts_per_rank, (rank % expert_parallel_size + 1) * experts_per_rank
            )
        ]
        for name, matches in result["held"].items():
            assert sorted(matches) == expected and all(matches.values()), (rank, name, matches)


# the script starts the process group through mymoe's own start-up (loop.run -> init_distributed), whose
# per-attempt store prefix is what lets the restarted workers join (torchrun keeps its store)
TORCHRUN_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from conftest import tiny_config
from mymoe.train import loop

kill_at = int(sys.argv[1])
original = loop.Trainer.train_step

def train_step(self):
    if (self.step == kill_at and self.ctx.rank == 1 and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"):
        os.kill(os.getpid(), signal.SIGKILL)  # a lost worker, mid-run
    return original(self)

loop.Trainer.train_step = train_step
config = tiny_config(sys.argv[2], world_size=2, expert_parallel_size=2, max_steps=8,
                     train={{"checkpoint_interval": 2}})
result = loop.run(config, progress=False)
if int(os.environ["RANK"]) == 0:
    print("FINAL_LOSS", repr(result.losses[-1]), "RESUMED_AT", 8 - len(result.losses), flush=True)
"""


def run_torchrun(tmp_path: Path, workdir: Path, kill_at: int) -> tuple[float, int]:
    script = tmp_path / "train_with_kill.py"
    script.write_text(TORCHRUN_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "--max-restarts=1",
        "--monitor-interval=0.2",
        str(script),
        str(kill_at),
        str(workdir),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=150, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    line = [line for line in done.stdout.splitlines() if line.startswith("FINAL_LOSS")][-1].split()
    return float(line[1]), int(line[3])


@pytest.mark.slow
def test_worker_killed_under_torchrun_recovers_to_the_same_final_loss(tmp_path):
    straight_loss, started_at = run_torchrun(tmp_path, tmp_path / "straight", kill_at=-1)
    recovered_loss, resumed_at = run_torchrun(tmp_path, tmp_path / "killed", kill_at=5)
    assert started_at == 0 and resumed_at == 4  # the restart resumed from the step-4 checkpoint
    assert recovered_loss == straight_loss
