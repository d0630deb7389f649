"""Issue 14: no run destroys its own good checkpoints, every wait has a deadline, every bad input is one
line before any work. One section per failure the issue lists; each test proves the promise (nothing lost,
a named error within the deadline, a one-line message naming the input and the fix, a non-zero exit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from mymoe.checkpoint import CheckpointManager, committed_steps, read_manifest, resolve_checkpoint
from mymoe.parallel import ParallelContext
from conftest import tiny_config, train_until, write_dataset


def write_config(workdir: Path, **sections) -> str:
    """configs for the command line: test_checkpoint's tiny model as a YAML file; sections update it."""
    values = tiny_config(workdir).to_dict()
    for section, updates in sections.items():
        values[section].update(updates)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def train_cli(argv: list[str]) -> str:
    """Run `mymoe-train` in this process; the one-line message it exits with ("" on success)."""
    from mymoe.train.__main__ import main

    try:
        main(argv + ["--no-progress"])
    except SystemExit as exit:
        assert exit.code not in (0, None), "exited 0"
        message = str(exit.code)
        assert "\n" not in message and "Traceback" not in message, message
        return message
    return ""


def steps_of(root: Path) -> list[int]:
    return [step for step, _ in committed_steps(root)]


# ---------------------------------------------------------------------------------------------------
# 1. retention: keep-last deletes only this run's older steps; resume=false never mixes runs


def test_keep_last_never_prunes_another_runs_steps_or_the_new_run(tmp_path):
    from mymoe.train.loop import Trainer

    root = tmp_path / "run" / "checkpoints"
    for run, save_at in (("old", (30, 31, 32)), ("new", (1, 2, 3))):
        config = tiny_config(tmp_path, max_steps=50, train={"keep_last": 2})
        trainer = Trainer(config, ParallelContext())
        manager = CheckpointManager(root, config, ParallelContext(), verbose=False)
        if run == "old":
            trainer.step = 29  # an older run that got further than the new one will
        train_until(trainer, manager, max(save_at), save_at)
    assert steps_of(root) == [2, 3, 31, 32]  # each run kept its own newest two
    assert read_manifest(root / "step_00000002")["run_id"] == read_manifest(root / "step_00000003")["run_id"]
    assert read_manifest(root / "step_00000003")["run_id"] != read_manifest(root / "step_00000032")["run_id"]
    assert (root / "latest").read_text().strip() == "step_00000003" and resolve_checkpoint(root).exists()


def test_resume_false_over_an_older_run_refuses_in_one_line_and_keeps_it(tmp_path):
    config = write_config(tmp_path, train={"max_steps": 4, "checkpoint_interval": 2})
    assert train_cli(["--config", config]) == ""
    root = tmp_path / "run" / "checkpoints"
    before = {path.name: path.stat().st_mtime_ns for path in root.iterdir()}
    message = train_cli(["--config", config, "--train.resume=false"])
    assert "train.resume=false" in message and "--train.out_dir" in message and "steps 2, 4 of run" in message
    assert {path.name: path.stat().st_mtime_ns for path in root.iterdir()} == before  # nothing touched


# ---------------------------------------------------------------------------------------------------
# 2. non-finite guard: skip, stop after a few naming the culprit, never save nan


def poison_after(step: int, parameter: str):
    """A Trainer.train_step that writes nan into one parameter once the trainer reaches `step`."""
    from mymoe.train import loop

    original = loop.Trainer.train_step

    def train_step(self):
        if self.step == step:
            with torch.no_grad():
                dict(self.model.named_parameters())[parameter].fill_(float("nan"))
        return original(self)

    return train_step


def test_diverging_run_skips_then_stops_naming_the_module_and_keeps_its_good_checkpoints(tmp_path, monkeypatch):
    from mymoe.train import loop

    monkeypatch.setattr(loop.Trainer, "train_step", poison_after(4, "model.layers.1.mlp.experts.w_up"))
    config = write_config(tmp_path, train={"max_steps": 12, "checkpoint_interval": 4, "keep_last": 1})
    message = train_cli(["--config", config])
    assert "steps 5-7 all had a non-finite loss or gradient norm" in message, message
    assert "model.layers.1.mlp.experts.w_up" in message and "--train.lr" in message
    root = tmp_path / "run" / "checkpoints"
    assert steps_of(root) == [4]  # saved before the nan; nothing after it, so nothing good was pruned
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r and r["loss"] != r["loss"]] == [5, 6, 7]


def test_a_skipped_step_leaves_the_weights_alone_and_nan_state_is_never_saved(tmp_path):
    from mymoe.checkpoint import CheckpointError
    from mymoe.train.loop import Trainer

    config = tiny_config(tmp_path, max_steps=4)
    trainer = Trainer(config, ParallelContext())
    manager = CheckpointManager(tmp_path / "run" / "checkpoints", config, ParallelContext(), verbose=False)
    train_until(trainer, manager, 2, (2,))
    weights = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    forward = trainer.forward

    def forward_to_nan_loss(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.lm_loss = out.lm_loss * float("nan")
        return out

    trainer.forward = forward_to_nan_loss
    metrics = trainer.train_step()
    trainer.forward = forward
    assert metrics["skipped"] and trainer.step == 3
    assert all(torch.equal(p, weights[name]) for name, p in trainer.model.named_parameters())
    with torch.no_grad():
        trainer.model.model.embed_tokens.weight[0, 0] = float("inf")
    with pytest.raises(
        CheckpointError,
        match=r"step 3 was not saved: model\.model\.embed_tokens\.weight holds nan "
        r"or inf .*step_00000002 is kept",
    ):
        manager.save(trainer)
    assert steps_of(tmp_path / "run" / "checkpoints") == [2]
    assert not list((tmp_path / "run" / "checkpoints").glob("*.partial"))


def nonfinite_on_one_rank_worker(rank, world_size, workdir):
    from mymoe.parallel import init_distributed, shutdown
    from mymoe.train.errors import TrainingError
    from mymoe.train.guard import NonFiniteGuard
    from mymoe.train.loop import Trainer

    config = tiny_config(workdir, world_size=2, expert_parallel_size=2, train={"max_nonfinite_steps": 2})
    ctx = init_distributed(config)
    try:
        trainer = Trainer(config, ctx)
        trainer.train_step()
        if rank == 1:  # only rank 1 holds experts 2 and 3
            with torch.no_grad():
                dict(trainer.model.named_parameters())["model.layers.0.mlp.experts.w_down"].fill_(float("nan"))
        guard, skipped = NonFiniteGuard(2), []
        try:
            for _ in range(3):
                metrics = trainer.train_step()
                skipped.append(metrics["skipped"])
                guard.observe(trainer, metrics, type("Quiet", (), {"write": lambda self, line: None})())
        except TrainingError as error:
            return {"skipped": skipped, "error": str(error)}
        return {"skipped": skipped, "error": None}
    finally:
        shutdown()


@pytest.mark.slow
def test_a_nan_on_one_rank_is_skipped_and_stopped_on_every_rank_alike(tmp_path):
    from dist_utils import run_distributed

    results = run_distributed(
        nonfinite_on_one_rank_worker, 2, args=(str(tmp_path),), init_process_group=False, timeout=90
    )
    for result in results:
        assert result.value["skipped"] == [True, True], result.value
        assert "steps 2-3 all had a non-finite loss or gradient norm" in result.value["error"]
        assert "rank 1: parameter model.layers.0.mlp.experts.w_down" in result.value["error"]


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("--train.lr=inf", "train.lr=inf must be a finite number"),
        ("--model.rms_norm_eps=-1", "model.rms_norm_eps=-1.0 must be a small positive number"),
    ],
)
def test_values_that_would_diverge_are_refused(tmp_path, override, fragment):
    message = train_cli(["--config", write_config(tmp_path), override])
    assert fragment in message, message


# ---------------------------------------------------------------------------------------------------
# 6. one job per out_dir


HOLD_LOCK = """
import sys, time
from mymoe.parallel import ParallelContext
from mymoe.train.lock import out_dir_lock
with out_dir_lock(sys.argv[1], ParallelContext()):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_job_on_one_out_dir_refuses_naming_the_first_and_a_dead_ones_lock_is_taken_over(tmp_path):
    import subprocess
    import sys

    config = write_config(tmp_path, train={"max_steps": 2})
    other = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert other.stdout.readline().strip() == "locked"
        message = train_cli(["--config", config])
        assert f"train.out_dir={tmp_path / 'run'} is in use by another job (pid {other.pid} on " in message, message
        assert "--train.out_dir" in message and "train.lock" in message
        assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()
    finally:
        other.kill()
        other.wait()
    assert (tmp_path / "run" / "train.lock").exists()  # left by the killed job: stale, its pid is gone
    assert train_cli(["--config", config]) == ""
    assert steps_of(tmp_path / "run" / "checkpoints") == [2] and not (tmp_path / "run" / "train.lock").exists()


# ---------------------------------------------------------------------------------------------------
# 3. one deadline: a rank stopped during a save fails the others within parallel.timeout_seconds


DEADLINE_SECONDS = 5


def stalled_save_worker(rank, world_size, workdir):
    import os
    import signal
    import time

    import torch.distributed as dist

    from mymoe.checkpoint import manager as manager_module
    from mymoe.parallel import CollectiveError, init_distributed, shutdown
    from mymoe.train.loop import Trainer

    config = tiny_config(workdir, world_size=2, expert_parallel_size=2, train={"keep_last": 3})
    config.parallel.timeout_seconds = DEADLINE_SECONDS
    ctx = init_distributed(config)
    pids = [None, None]
    dist.all_gather_object(pids, os.getpid())
    trainer = Trainer(config, ctx)
    manager = CheckpointManager(Path(config.train.out_dir) / "checkpoints", config, ctx, verbose=False)
    train_until(trainer, manager, 1, (1,))
    if rank == 1:  # stops (as SIGSTOP or a hung disk would) once its shard of step 2 is written
        manager_module.expert_checksums_of = lambda tensors: os.kill(os.getpid(), signal.SIGSTOP)
    start = time.monotonic()
    try:
        train_until(trainer, manager, 2, (2,))
        return {"error": None}
    except CollectiveError as error:
        return {"error": str(error), "seconds": time.monotonic() - start}
    finally:
        if rank == 0:
            os.kill(pids[1], signal.SIGKILL)
        shutdown()


@pytest.mark.slow
def test_a_rank_stopped_during_a_save_fails_the_other_within_the_deadline(tmp_path):
    from dist_utils import run_distributed

    results = run_distributed(
        stalled_save_worker, 2, args=(str(tmp_path),), init_process_group=False, timeout=90, raise_errors=False
    )
    outcome = results[0].value
    assert outcome and outcome["error"], f"{results[0].error_type}: {results[0].error}"
    assert "all_gather_object (checkpoint: file checksums of step 2) timed out after 5 s" in outcome["error"]
    assert outcome["seconds"] < DEADLINE_SECONDS + 10, outcome
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000001" and steps_of(root) == [1]


# ---------------------------------------------------------------------------------------------------
# 8. metrics.jsonl holds every step once after a restart


def test_a_restarted_run_logs_each_replayed_step_once(tmp_path):
    config = write_config(tmp_path, train={"max_steps": 5, "checkpoint_interval": 3, "keep_last": 5})
    assert train_cli(["--config", config]) == ""
    root = tmp_path / "run" / "checkpoints"
    (root / "latest").write_text("step_00000003\n")  # as if the run had died after logging steps 4 and 5
    for path in (root / "step_00000005").iterdir():
        path.unlink()
    (root / "step_00000005").rmdir()
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 1.')  # and cut a line short as it died
    assert train_cli(["--config", config]) == ""
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert steps == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------------------------------------------
# 4. every input checked at start-up, before any work


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


BAD_INPUTS = {
    "truncated valid .bin": (
        lambda valid: _truncate(Path(valid + ".bin"), 1000),
        {},
        "valid.bin has 1000 bytes but its index describes 4000 tokens",
    ),
    "empty valid .idx": (lambda valid: Path(valid + ".idx").write_bytes(b""), {}, "valid.idx is empty (0 bytes)"),
    "empty valid .bin": (
        lambda valid: Path(valid + ".bin").write_bytes(b""),
        {},
        "valid.bin has 0 bytes but its index describes 4000 tokens",
    ),
    "ids beyond the vocabulary": (
        lambda valid: write_dataset(valid, vocab_size=100, seed=3),
        {},
        "valid.bin holds token id 9",
    ),
    "not a tokenizer": (
        lambda valid: Path(valid + ".model").write_text("not a model"),
        {"data": {"tokenizer": "{valid}.model"}},
        "valid.model is not a sentencepiece model",
    ),
    "seq_len beyond the positions": (
        lambda valid: None,
        {"data": {"seq_len": 4096}},
        "data.seq_len=4096 is longer than the model's positions (model.max_position_embeddings=2048)",
    ),
    "cannot fit in memory": (
        lambda valid: None,
        {"data": {"seq_len": 100000}, "train": {"micro_batch_size": 64}, "model": {"max_position_embeddings": 200000}},
        "GiB per process but has",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_a_bad_input_is_one_line_before_any_work(tmp_path, case):
    spoil, sections, fragment = BAD_INPUTS[case]
    valid = str(tmp_path / "valid")
    write_dataset(valid, seed=1)
    spoil(valid)
    sections = {
        name: {key: value.format(valid=valid) if isinstance(value, str) else value for key, value in updates.items()}
        for name, updates in sections.items()
    }
    sections.setdefault("data", {})["valid_prefixes"] = [valid]
    sections.setdefault("train", {}).update(eval_interval=2, max_steps=2)
    message = train_cli(["--config", write_config(tmp_path, **sections)])
    assert fragment in message, message
    assert not (tmp_path / "run").exists()  # refused before anything was written


# ---------------------------------------------------------------------------------------------------
# 7. one line, naming the input and the fix, for every bad value and file


BAD_CONFIGS = {
    "malformed YAML": ("model: [unclosed\n", [], "is not a YAML config at line 2"),
    "binary YAML": (bytes(range(256)) * 4, [], "is not a YAML config"),
    "a scalar for a section": ("train: 5\n", [], "config.train=5: 'train' is a section"),
    "a scalar for a nested section": ("model:\n  moe: 3\n", [], "config.model.moe=3: 'moe' is a section"),
    "seed=-1": (None, ["--train.seed=-1"], "train.seed=-1 must be a non-negative integer"),
    "NaN": (None, ["--train.min_lr=nan"], "train.min_lr=nan must be a finite number"),
    "keep_last=-1": (None, ["--train.keep_last=-1"], "train.keep_last=-1 must be a non-negative integer"),
    "grad_clip=nan": (None, ["--train.grad_clip=nan"], "train.grad_clip=nan must be a finite number"),
    "weight_decay=-10": (None, ["--train.weight_decay=-10"], "train.weight_decay=-10.0 must be >= 0"),
    "a list as out_dir": (None, ["--train.out_dir=[a, b]"], "train.out_dir=['a', 'b'] must be a single value"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_a_bad_config_is_one_line_naming_the_value(tmp_path, case):
    content, overrides, fragment = BAD_CONFIGS[case]
    config = write_config(tmp_path)
    if content is not None:
        Path(config).write_bytes(content if isinstance(content, bytes) else content.encode())
    message = train_cli(["--config", config] + overrides)
    assert fragment in message, message
    assert not (tmp_path / "run").exists()


def test_disk_full_during_a_save_is_one_line_and_loses_nothing(tmp_path, monkeypatch):
    import errno

    import mymoe.checkpoint.checksummed as checksummed

    from mymoe.checkpoint import CheckpointError
    from mymoe.load import load_model
    from mymoe.train.loop import Trainer

    config = tiny_config(tmp_path, max_steps=4)
    trainer = Trainer(config, ParallelContext())
    root = tmp_path / "run" / "checkpoints"
    manager = CheckpointManager(root, config, ParallelContext(), verbose=False)
    train_until(trainer, manager, 2, (2,))

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(root / "step_00000003.partial" / "__0_0.distcp"))

    monkeypatch.setattr(checksummed, "write_record", disk_full)
    with pytest.raises(CheckpointError) as error:
        train_until(trainer, manager, 3, (3,))
    message = str(error.value)
    assert "\n" not in message and "saving step 3 failed (rank 0: no space left on device writing " in message
    assert "step_00000002 is intact" in message, message
    assert sorted(path.name for path in root.iterdir()) == ["latest", "step_00000002"]  # the partial is gone
    _, _, manifest = load_model(root)
    assert manifest["step"] == 2


def test_corrupt_jsonl_gz_is_one_line_naming_the_file(tmp_path, tokenizer_model, capsys):
    from data_tools.cli import main

    corpus = tmp_path / "corpus.jsonl.gz"
    corpus.write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(200)))
    code = main(
        [
            "preprocess",
            "--input",
            str(corpus),
            "--tokenizer",
            tokenizer_model,
            "--output",
            str(tmp_path / "out"),
            "--quiet",
        ]
    )
    error = capsys.readouterr().err.strip()
    assert code != 0 and len(error.splitlines()) == 1, error
    assert f"{corpus} is not a readable gzip file" in error and "re-compress" in error


def test_generate_refuses_nan_weights_in_one_line(tmp_path, capsys, monkeypatch):
    from mymoe.generate import main
    from mymoe.train.loop import Trainer

    config = tiny_config(tmp_path)
    trainer = Trainer(config, ParallelContext())
    root = tmp_path / "run" / "checkpoints"
    manager = CheckpointManager(root, config, ParallelContext(), verbose=False)
    with torch.no_grad():
        trainer.model.model.norm.weight[0] = float("nan")
    monkeypatch.setattr(manager, "_refuse_nonfinite", lambda tensors, step: None)  # as a save before this check
    manager.save(trainer)
    assert main(["--checkpoint", str(root), "--prompt", "x"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "model.norm.weight holds nan or inf" in error and "--step" in error, error


def test_an_hf_config_missing_a_key_is_one_line(tmp_path, capsys):
    from mymoe.convert.cli import main

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "mixtral", "vocab_size": 64}))
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "out.safetensors")]) == 1
    printed = capsys.readouterr().err
    error = printed.strip().splitlines()[-1]
    assert (
        "Traceback" not in printed
        and error.startswith("error: ")
        and "config.json has no 'intermediate_size' key" in error
    ), printed


def test_integer_weights_are_refused_where_floats_belong(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mymoe.checkpoint import CheckpointError
    from mymoe.convert.consolidate import consolidate
    from mymoe.load import load_model
    from mymoe.train.loop import Trainer

    config = tiny_config(tmp_path)
    root = tmp_path / "run" / "checkpoints"
    CheckpointManager(root, config, ParallelContext(), verbose=False).save(Trainer(config, ParallelContext()))
    consolidate(root, tmp_path / "w.safetensors", weights_only=True)
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        metadata, tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int64)
    save_file(tensors, str(tmp_path / "w.safetensors"), metadata=metadata)
    with pytest.raises(
        CheckpointError,
        match=r"'model.norm.weight' in .*w.safetensors holds torch.int64 values "
        r"where the model needs floats",
    ):
        load_model(tmp_path / "w.safetensors")


# ---------------------------------------------------------------------------------------------------
# 5. a bounded stop: a long step or evaluation still ends with a checkpoint, in seconds


def forward_signalled_at(call: int, training: bool, hang_seconds: float):
    """MoECausalLM.forward that sends this process SIGTERM at its `call`-th training (or eval) call, then
    keeps computing for `hang_seconds` (a huge step or a long evaluation); counts[0] counts those calls."""
    import os
    import signal
    import time

    from mymoe.model import MoECausalLM

    original, counts = MoECausalLM.forward, [0]

    def forward(self, *args, **kwargs):
        if self.training == training:
            counts[0] += 1
            if counts[0] == call:
                os.kill(os.getpid(), signal.SIGTERM)
                end = time.monotonic() + hang_seconds
                while time.monotonic() < end:
                    time.sleep(0.05)
        return original(self, *args, **kwargs)

    return forward, counts


def test_sigterm_in_a_huge_step_of_one_process_saves_the_step_boundary_within_the_deadline(tmp_path, monkeypatch):
    import signal
    import time

    from mymoe.model import MoECausalLM
    from mymoe.train.loop import Trainer

    forward, _ = forward_signalled_at(3, training=True, hang_seconds=600)
    monkeypatch.setattr(MoECausalLM, "forward", forward)
    config = write_config(tmp_path, train={"max_steps": 6, "stop_timeout_seconds": 2})
    start = time.monotonic()
    assert train_cli(["--config", config]) == ""
    assert time.monotonic() - start < 60  # not 600: the step was abandoned 2 s after the signal
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000002"
    monkeypatch.undo()
    straight = Trainer(tiny_config(tmp_path), ParallelContext())
    for _ in range(2):
        straight.train_step()
    assert read_manifest(root / "step_00000002")["train_reader"] == straight.train_reader.state_dict()


def test_sigterm_during_a_long_evaluation_stops_it_between_batches_and_saves(tmp_path, monkeypatch):
    from mymoe.model import MoECausalLM

    forward, calls = forward_signalled_at(1, training=False, hang_seconds=0)
    monkeypatch.setattr(MoECausalLM, "forward", forward)
    valid = str(tmp_path / "valid")
    write_dataset(valid, seed=1)
    config = write_config(
        tmp_path, train={"max_steps": 6, "eval_interval": 2, "eval_steps": 100000}, data={"valid_prefixes": [valid]}
    )
    assert train_cli(["--config", config]) == ""
    assert calls[0] == 1  # the evaluation stopped after the batch the signal came in
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000002"
