"""CheckpointManager: sharded save with an atomic commit, keep-last-N, optional async save, and resume.

A save, on every rank at once:

    1. rank 0 clears step_N.partial/ (left by a save that died), all ranks wait for it
    2. DCP writes each rank's own tensors into step_N.partial/ (one file per rank, fsynced; each tensor that
       all ranks hold written by one, chosen so that every rank writes about as many bytes: balance.py);
       rank 0 writes DCP's index after every rank has reported its writes
    3. each rank reports the crc32s its writer took as it wrote (of each file and each record, so nothing is
       read back); rank 0 gathers them with every expert's crc32 into manifest.json,
       renames step_N.partial -> step_N, fsyncs the folder, then points `latest` at it (write + rename)
    4. rank 0 deletes this run's steps beyond keep_last (retention.py says which may go) and tells every
       rank the save is done

A crash anywhere before the rename leaves only a .partial folder, which nothing reads, and `latest` still
names the previous step. With async_save the state is first copied (the only part the training step
waits for) and steps 1-4 run on a thread over a process group of their own.

A load reads each rank's share once, into fresh tensors, checking every record's crc32 as its bytes arrive
(checksummed.py). dcp.load raises any rank's refusal on every rank, so the trainer's live weights are
overwritten only by a checkpoint that every rank has read whole and found sound; a checkpoint saved before
records had sums has its files checked whole first, as before.
"""

from __future__ import annotations

import datetime
import errno
import shutil
import contextlib
import threading
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor

from mymoe.checkpoint.balance import BalancedSavePlanner
from mymoe.checkpoint.checksummed import ChecksummedReader, ChecksummingWriter
from mymoe.checkpoint.layout import flatten, load_targets, restore_param_groups
from mymoe.checkpoint.retention import first_nonfinite, new_run_id, run_of, steps_to_prune
from mymoe.checkpoint.storage import (
    FORMAT_VERSION,
    MANIFEST,
    METADATA,
    CheckpointError,
    SafeFileSystemReader,
    TensorsOnlyLoadPlanner,
    file_crc32,
    fsync_directory,
    read_dcp_metadata,
    read_manifest,
    tensor_crc32,
    verify_files,
    write_json_durably,
)
from mymoe.config import Config, architecture_fields
from mymoe.tokenizer import TokenizerError, tokenizer_file
from mymoe.parallel.collectives import named_collective

LATEST = "latest"
RECORD_CHECKSUMS = "record_crc32"  # manifest: file name -> {record offset: crc32}
STEP_PREFIX = "step_"
PARTIAL_SUFFIX = ".partial"


def step_directory_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def committed_steps(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every committed checkpoint under root, oldest first."""
    found = []
    if root.is_dir():
        for path in root.iterdir():
            name = path.name
            if name.startswith(STEP_PREFIX) and name[len(STEP_PREFIX) :].isdigit() and (path / MANIFEST).exists():
                found.append((int(name[len(STEP_PREFIX) :]), path))
    return sorted(found)


def resolve_checkpoint(root: str | Path, step: Optional[int] = None) -> Optional[Path]:
    """The folder of `step`, or of the newest committed checkpoint (what `latest` names); None if there is none.

    `root` may also be a step folder itself.
    """
    root = Path(root)
    if (root / MANIFEST).exists() and step is None:
        return root
    if step is not None:
        path = root / step_directory_name(step)
        if not (path / MANIFEST).exists():
            available = ", ".join(str(s) for s, _ in committed_steps(root)) or "none"
            raise CheckpointError(f"no committed checkpoint for step {step} in {root} (available steps: {available})")
        return path
    latest = root / LATEST
    if latest.exists():
        path = root / latest.read_text().strip()
        if (path / MANIFEST).exists():
            return path
    steps = committed_steps(root)  # `latest` lost or stale: the newest committed folder is still a checkpoint
    return steps[-1][1] if steps else None


def find_checkpoint(checkpoint: str | Path, step: Optional[int] = None, verify: bool = True) -> tuple[Path, dict]:
    """The committed step folder under `checkpoint` (its `latest`, or `step`; or a step folder itself) and its
    manifest, with every file checked against its crc32 unless verify is False."""
    directory = resolve_checkpoint(checkpoint, step)
    if directory is None:
        raise CheckpointError(
            f"no committed checkpoint under {checkpoint}: train first, or pass a run's "
            f"checkpoints folder (the one that holds the step_* directories) or one step_* folder"
        )
    manifest = read_manifest(directory)
    if verify:
        problems = verify_files(directory, manifest["files"])
        if problems:
            raise CheckpointError(
                f"checkpoint {directory} is damaged, nothing was read from it:\n  " + "\n  ".join(problems)
            )
    return directory, manifest


def _get(values: dict, dotted: str):
    for key in dotted.split("."):
        values = values.get(key, {}) if isinstance(values, dict) else {}
    return values if values != {} else None


def architecture_differences(saved_model: dict, current_model: dict) -> list[str]:
    """`field: checkpoint X, this run Y` for each architecture field that differs: the model fields the
    config marks as changing the shape or meaning of the weights (the rest, such as noise, capacity and
    checkpointing, may change between runs). A field that matters only under a setting (the latent
    attention sizes under attention_type=mla) is compared when either side has that setting."""
    differences = []
    for name, when in architecture_fields():
        if when is not None and when[1] not in (_get(saved_model, when[0]), _get(current_model, when[0])):
            continue
        if _get(saved_model, name) != _get(current_model, name):
            differences.append(
                f"model.{name}: checkpoint {_get(saved_model, name)!r}, this run {_get(current_model, name)!r}"
            )
    return differences


def check_compatible(manifest: dict, config: Config, directory: Path) -> None:
    """Refuse a checkpoint of another architecture or tokenizer, saying what differs."""
    differences = architecture_differences(manifest["config"]["model"], config.to_dict()["model"])
    saved_tokenizer = manifest.get("tokenizer")
    current_tokenizer = tokenizer_fingerprint(config)
    if saved_tokenizer and current_tokenizer and saved_tokenizer["crc32"] != current_tokenizer["crc32"]:
        differences.append(
            f"data.tokenizer: checkpoint {saved_tokenizer['path']} (crc32 {saved_tokenizer['crc32']:08x}), "
            f"this run {current_tokenizer['path']} (crc32 {current_tokenizer['crc32']:08x})"
        )
    if differences:
        raise CheckpointError(
            f"{directory} was saved from a different model and cannot be loaded into this one:\n  "
            + "\n  ".join(differences)
            + "\nuse the checkpoint's settings, or start from scratch with --train.resume=false "
            "and another --train.out_dir"
        )


def tokenizer_fingerprint(config: Config) -> Optional[dict]:
    if not config.data.tokenizer:
        return None
    try:
        path = tokenizer_file(config.data.tokenizer)  # a model folder: its tokenizer.json
    except TokenizerError:
        return None
    return {"path": str(path), "crc32": file_crc32(path)[1]}


def expert_checksums_of(crcs: dict[str, int]) -> dict[str, dict[str, int]]:
    """{param name: {global expert: crc32}} from crc32s by flat checkpoint key, keeping the per-expert model
    tensors. At save the crc32s are those the writer took as it wrote each tensor whole
    (`ChecksummingWriter.tensors`); every expert is written whole by one rank, except one split over ranks
    (FSDP with fewer local experts than ranks), which has no whole to sum: its records' crc32s still guard it."""
    sums: dict[str, dict[str, int]] = {}
    for key, crc in crcs.items():
        if key.startswith("model.") and ".expert_" in key:
            name, _, expert = key[len("model.") :].rpartition(".expert_")
            sums.setdefault(name, {})[expert] = crc
    return sums


class CheckpointManager:
    """Sharded checkpoints of a Trainer under `root_dir` (collective: every rank constructs and calls it).

    The trainer is reached through its seam, `state_dict()` / `load_state_dict()`, plus its `model` and
    `optimizer` attributes for parameter names and the expert layout.
    """

    def __init__(self, root_dir: str | Path, config: Config, ctx, thread_count: int = 1, verbose: bool = True):
        self.root = Path(root_dir)
        self.config, self.ctx = config, ctx
        self.keep_last = config.train.keep_last
        self.async_save = config.train.async_save
        self.thread_count = thread_count
        self.verbose = verbose and ctx.rank == 0
        # checkpoint collectives get their own gloo group: it moves only small objects, works next to nccl,
        # and an async save's thread never shares a group with the training step; it waits no longer than
        # any other collective (parallel.timeout_seconds), so a stalled rank fails a save with a named error
        self.timeout_seconds = ctx.timeout_seconds
        self.group = (
            dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=ctx.timeout_seconds))
            if ctx.is_distributed
            else None
        )
        self._thread: Optional[threading.Thread] = None
        self._thread_error: Optional[BaseException] = None
        self.last_save_seconds = 0.0
        self.run_id: Optional[str] = None  # set by load (the run goes on) or at the first save (a new run)

    # ------------------------------------------------------------------------------------------------
    # save

    def save(self, trainer) -> None:
        """Save the trainer's state as step_<trainer.step>; returns once committed, or once staged if async."""
        self.wait()
        start = time.perf_counter()
        state = trainer.state_dict()
        tensors, extras = flatten(state, trainer.model, trainer.optimizer, self.ctx.rank)
        self._refuse_nonfinite(tensors, extras["step"])
        if self.async_save:
            # the staged copy is what makes the save safe to overlap with the next optimizer steps
            tensors = {key: value.detach().to("cpu", copy=True) for key, value in tensors.items()}

            def background():
                try:
                    self._write(tensors, extras, start)
                except BaseException as error:  # re-raised on the training thread by wait()
                    self._thread_error = error

            self._thread = threading.Thread(target=background, name="mymoe-checkpoint", daemon=True)
            self._thread.start()
        else:
            self._write(tensors, extras, start)

    def _refuse_nonfinite(self, tensors: dict, step: int) -> None:
        """Raise on every rank, before anything is written, if any rank's state holds nan or inf."""
        found = [
            (rank, key)
            for rank, key in enumerate(self._gather(first_nonfinite(tensors), f"finiteness of step {step}"))
            if key
        ]
        if found:
            rank, key = found[0]
            previous = resolve_checkpoint(self.root)
            raise CheckpointError(
                f"step {step} was not saved: {key} holds nan or inf (rank {rank}); the last good "
                f"checkpoint {previous or '(none yet)'} is kept: resume from it with a lower "
                f"--train.lr or --train.grad_clip"
            )

    def wait(self) -> None:
        """Block until an async save has committed; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._thread_error is not None:
            error, self._thread_error = self._thread_error, None
            raise error

    def _write(self, tensors: dict, extras: dict, start: float) -> None:
        rank, step = self.ctx.rank, extras["step"]
        final = self.root / step_directory_name(step)
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(f"{STEP_PREFIX}*{PARTIAL_SUFFIX}"):
                shutil.rmtree(stale)
            partial.mkdir()
        self._barrier(f"clearing {partial.name}")
        writer = ChecksummingWriter(partial, thread_count=self.thread_count)
        try:
            with _quiet_single_process(self.group is None):
                dcp.save(
                    tensors,
                    storage_writer=writer,
                    planner=BalancedSavePlanner(),
                    process_group=self.group,
                    no_dist=self.group is None,
                )
        except (Exception, CheckpointException) as write_error:  # DCP's own exception is a BaseException
            self._give_up(partial, step, one_line_failure(write_error))
        files = dict(writer.files)  # summed as they were written; DCP's small index is read back
        if rank == 0:
            files[METADATA] = dict(zip(("bytes", "crc32"), file_crc32(partial / METADATA)))
        report = {"files": files, "records": writer.records, "experts": expert_checksums_of(writer.tensors)}
        reports = self._gather(report, f"file checksums of step {step}")
        error = None
        if rank == 0:
            try:
                self._commit(partial, final, extras, reports)
            except BaseException as commit_error:
                error = one_line_failure(commit_error)
        error = self._broadcast(error, f"commit of step {step}")
        if error is not None:
            self._give_up(partial, step, f"rank 0: {error}")
        self.last_save_seconds = time.perf_counter() - start
        if self.verbose:
            size = sum(info["bytes"] for report in reports for info in report["files"].values())
            print(
                f"checkpoint: step {step} saved to {final} ({size / 2**20:.1f} MiB, "
                f"{self.last_save_seconds:.2f} s{', async' if self.async_save else ''})",
                flush=True,
            )

    def _give_up(self, partial: Path, step: int, why: str) -> None:
        """A save that failed: its partial folder goes (disk space back), the committed steps stay."""
        if self.ctx.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        previous = resolve_checkpoint(self.root)
        raise CheckpointError(
            f"saving step {step} failed ({why}); nothing was committed and "
            f"{previous or 'no earlier checkpoint'} is intact"
        )

    def _commit(self, partial: Path, final: Path, extras: dict, reports: list[dict]) -> None:
        files, records, experts = {}, {}, {}
        for report in reports:
            files.update(report["files"])
            records.update(report["records"])
            for name, sums in report["experts"].items():
                experts.setdefault(name, {}).update(sums)
        if self.run_id is None:
            self.run_id = new_run_id()
        manifest = {
            "format_version": FORMAT_VERSION,
            **extras,
            "run_id": self.run_id,
            "config": self.config.to_dict(),
            "world_size": self.ctx.world_size,
            "expert_parallel_size": self.ctx.expert_parallel_size,
            "files": files,
            RECORD_CHECKSUMS: records,
            "expert_checksums": experts,
            "tokenizer": tokenizer_fingerprint(self.config),
            "torch_version": torch.__version__,
            "saved_at": time.time(),
        }
        write_json_durably(partial / MANIFEST, manifest)
        fsync_directory(partial)
        if final.exists():  # the same step saved again (a resumed run): the new one replaces it
            shutil.rmtree(final)
        partial.rename(final)
        fsync_directory(self.root)
        latest = self.root / LATEST
        temporary = latest.with_name(LATEST + ".tmp")
        temporary.write_text(final.name + "\n")
        temporary.replace(latest)
        fsync_directory(self.root)
        for old in steps_to_prune(committed_steps(self.root), self.run_id, self.keep_last):
            shutil.rmtree(old)

    # ------------------------------------------------------------------------------------------------
    # load

    def latest(self) -> Optional[Path]:
        """The newest committed checkpoint folder as rank 0 sees it (every rank gets the same answer)."""
        found = resolve_checkpoint(self.root) if self.ctx.rank == 0 else None
        found = self._broadcast(None if found is None else str(found), "looking up the newest checkpoint")
        return None if found is None else Path(found)

    def load_latest(self, trainer) -> bool:
        """Resume from the newest committed checkpoint; False (and nothing changed) when there is none."""
        self.wait()
        directory = self.latest()
        if directory is None:
            return False
        self.load(trainer, directory)
        return True

    def load(self, trainer, directory: str | Path) -> None:
        """Load a checkpoint saved at any world size and expert-parallel size into this trainer's layout."""
        start = time.perf_counter()
        directory = Path(directory)
        manifest = read_manifest(directory)
        check_compatible(manifest, self.config, directory)
        self.run_id = run_of(manifest)
        if RECORD_CHECKSUMS not in manifest:  # saved before records had sums: check whole files first
            self.verify(directory, manifest)
        template = trainer.state_dict()
        targets, rng = read_tensors(
            directory, manifest, template, trainer.model, trainer.optimizer, self.ctx.rank, self.group
        )
        optimizer = {
            "state": targets.optimizer_state,
            "param_groups": restore_param_groups(
                template["optimizer"]["param_groups"], manifest["optimizer_param_groups"]
            ),
        }
        trainer.load_state_dict(
            {
                "step": manifest["step"],
                "tokens_seen": manifest["tokens_seen"],
                "model": targets.model,
                "optimizer": optimizer,
                "train_reader": manifest["train_reader"],
                "loop": manifest.get("loop", {}),
                "rng": rng,
            }
        )
        if self.verbose:
            print(
                f"checkpoint: resumed from {directory} (step {manifest['step']}, saved at world size "
                f"{manifest['world_size']} / EP {manifest['expert_parallel_size']}, loaded at "
                f"{self.ctx.world_size} / EP {self.ctx.expert_parallel_size}, {time.perf_counter() - start:.2f} s)",
                flush=True,
            )

    def verify(self, directory: Path, manifest: dict) -> None:
        """Check every file's size and crc32, the files split over the ranks; all ranks raise alike."""
        names = sorted(manifest["files"])
        mine = {name: manifest["files"][name] for name in names[self.ctx.rank :: self.ctx.world_size]}
        problems = [
            p for report in self._gather(verify_files(directory, mine), f"verifying {directory.name}") for p in report
        ]
        if problems:
            raise CheckpointError(
                f"checkpoint {directory} is damaged:\n  "
                + "\n  ".join(problems)
                + "\nload an older step (see the step_* folders) or re-save it"
            )

    # ------------------------------------------------------------------------------------------------
    # collectives on the checkpoint group (no-ops in a single process)

    def _barrier(self, purpose: str) -> None:
        if self.group is not None:
            with named_collective(f"barrier (checkpoint: {purpose})", self.timeout_seconds):
                dist.barrier(group=self.group)

    def _gather(self, value, purpose: str) -> list:
        if self.group is None:
            return [value]
        values = [None] * self.ctx.world_size
        with named_collective(f"all_gather_object (checkpoint: {purpose})", self.timeout_seconds):
            dist.all_gather_object(values, value, group=self.group)
        return values

    def _broadcast(self, value, purpose: str):
        if self.group is None:
            return value
        box = [value]
        with named_collective(f"broadcast_object_list (checkpoint: {purpose})", self.timeout_seconds):
            dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


def one_line_failure(error: BaseException) -> str:
    """A save or load failure as one line: the first failing rank's error, without DCP's tracebacks."""
    if isinstance(error, CheckpointException) and error.failures:
        rank, (error, _) = sorted(error.failures.items())[0]
        return f"rank {rank}: {one_line_failure(error)}"
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return f"no space left on device{f' writing {error.filename}' if error.filename else ''}: free some space"
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


@contextlib.contextmanager
def _quiet_single_process(single: bool):
    """DCP warns on every single-process save and load that it assumes one process; here that is intended."""
    with warnings.catch_warnings():
        if single:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def saved_tensor_keys(directory: Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
    metadata = read_dcp_metadata(directory)
    return {
        key: (entry.size, entry.properties.dtype)
        for key, entry in metadata.state_dict_metadata.items()
        if isinstance(entry, TensorStorageMetadata)
    }


def checkpoint_reader(directory: Path, manifest: dict) -> SafeFileSystemReader:
    """The reader that checks each record's crc32 as it reads it; for a checkpoint saved before records had
    sums (whose files the caller has verified whole), DCP's reader."""
    if RECORD_CHECKSUMS in manifest:
        return ChecksummedReader(directory, manifest["files"], manifest[RECORD_CHECKSUMS])
    return SafeFileSystemReader(directory)


def read_tensors(directory: Path, manifest: dict, template: dict, model, optimizer, rank: int, group=None):
    """Read this rank's share of a checkpoint through DCP into fresh tensors: (LoadTargets, rng state). Every
    record read is checked against its crc32 (all ranks raise alike), and the expert weights read against
    the crc32s recorded at save, before anything reaches the caller's model."""
    saved = saved_tensor_keys(directory)
    targets = load_targets(template, model, optimizer, manifest, saved)
    rng_rank = rank if f"rng.cpu.rank_{rank}" in saved else 0  # a new rank starts from rank 0's stream
    rng = {"cpu": torch.empty(saved[f"rng.cpu.rank_{rng_rank}"][0], dtype=torch.uint8), "cuda": None}
    targets.tensors[f"rng.cpu.rank_{rng_rank}"] = rng["cpu"]
    if f"rng.cuda.rank_{rng_rank}" in saved and torch.cuda.is_available():
        rng["cuda"] = torch.empty(saved[f"rng.cuda.rank_{rng_rank}"][0], dtype=torch.uint8)
        targets.tensors[f"rng.cuda.rank_{rng_rank}"] = rng["cuda"]
    try:
        with _quiet_single_process(group is None):
            dcp.load(
                targets.tensors,
                storage_reader=checkpoint_reader(directory, manifest),
                planner=TensorsOnlyLoadPlanner(),
                process_group=group,
                no_dist=group is None,
            )
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as error:  # DCP's own exception is a BaseException
        refusal = first_refusal(error)
        if refusal is not None:
            raise CheckpointError(
                f"checkpoint {directory} is damaged, nothing was loaded ({refusal}); load an older step "
                f"(see the step_* folders) or re-save it"
            ) from None
        raise CheckpointError(f"reading tensors from {directory} failed: {error}") from None
    if RECORD_CHECKSUMS not in manifest:  # else every expert's record was checked as it was read
        check_expert_checksums(targets.tensors, manifest, directory)
    return targets, rng


def first_refusal(error: BaseException) -> Optional[str]:
    """`rank N: why` of the first rank whose read refused the checkpoint (a CheckpointError: a record that
    fails its crc32, a truncated file), else None."""
    if isinstance(error, CheckpointException):
        for rank, (failure, _) in sorted(error.failures.items()):
            if isinstance(failure, CheckpointError):
                return f"rank {rank}: {failure}"
    return None


def check_expert_checksums(tensors: dict, manifest: dict, directory: Path) -> None:
    saved = manifest["expert_checksums"]
    held_whole = {
        key: tensor_crc32(value)
        for key, value in tensors.items()
        if ".expert_" in key and not isinstance(value, DTensor)  # (an expert split over ranks has no whole)
    }
    for name, sums in expert_checksums_of(held_whole).items():
        for expert, crc in sums.items():
            recorded = saved.get(name, {}).get(expert)
            if recorded is not None and recorded != crc:
                raise CheckpointError(
                    f"expert {expert} of {name} read from {directory} does not match the crc32 "
                    f"recorded at save: the checkpoint is corrupt"
                )
