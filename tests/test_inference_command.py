"""`python -m mymoe.generate` run with the command lines of SimpleMoE's README (inference_moe.py) as they are
written, on small models at SimpleMoE's default paths (./checkpoints/model.pt, ./data/tokenizer.json):
text, long context, vectors; a .pt file that would run code is refused; --help imports no torch."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BASE, MIXTRAL, our_model
from mymoe.config import MoEConfig, config_from_dict, validate
from mymoe.generate import main
from mymoe.load import load_vector_model, save_vector_model
from mymoe.model.vector import VectorMoE

REPO = Path(__file__).resolve().parents[1]
CHARACTERS = list("abcdefghijklmnopqrstuvwxyz .,:") + list("这是一个测试：请写篇长文章故事")


def write_tokenizer_json(path: Path) -> None:
    """A character-level tokenizer.json (BPE without merges) of 47 ids: <unk> 0, </s> 1."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {"<unk>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(CHARACTERS)}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(["</s>"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))


def save_text_model(path: Path, fields: dict) -> torch.nn.Module:
    model = our_model(fields)
    config = validate(config_from_dict({"model": {**BASE, **fields}}))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_state_dict": model.state_dict(), "config": config.to_dict()}, path)
    return model


@pytest.fixture(scope="module")
def text_workdir(tmp_path_factory) -> Path:
    """SimpleMoE's layout: ./checkpoints/model.pt (a .pt state dict with its config), ./data/tokenizer.json."""
    workdir = tmp_path_factory.mktemp("simplemoe_text")
    save_text_model(workdir / "checkpoints" / "model.pt", MIXTRAL)
    write_tokenizer_json(workdir / "data" / "tokenizer.json")
    (workdir / "examples").mkdir()
    (workdir / "examples" / "prompts.txt").write_text("the cat\n这是一个测试：\n")
    return workdir


def run_here(workdir: Path, monkeypatch, capsys, command_line: list[str]):
    monkeypatch.chdir(workdir)
    code = main(command_line)
    out = capsys.readouterr()
    assert code == 0, out.err
    return out


def test_readme_basic_usage(text_workdir, monkeypatch, capsys):
    out = run_here(text_workdir, monkeypatch, capsys, ["--prompt", "这是一个测试："])
    assert out.out.startswith("这是一个测试：")
    assert "temperature 0.7, top_k 50, top_p 0.9, repetition penalty 1.1, seed 42" in out.err
    again = run_here(text_workdir, monkeypatch, capsys, ["--prompt", "这是一个测试：", "--input_file", ""])
    assert again.out == out.out  # seed 42 by default; --input_file "" means no input file


def test_readme_long_context_model_prints_its_context_length(text_workdir, monkeypatch, capsys):
    out = run_here(
        text_workdir, monkeypatch, capsys, ["--model_type", "long_transformer_moe", "--prompt", "请写一篇长文章："]
    )
    assert out.out.startswith("请写一篇长文章：")
    assert "context length: 512 positions (trained on 64, yarn x8)" in out.err
    dynamic = run_here(
        text_workdir,
        monkeypatch,
        capsys,
        [
            "--model_type",
            "long_transformer_moe",
            "--rope_scaling",
            "dynamic:4",
            "--prompt",
            "请写",
            "--max_new_tokens",
            "3",
        ],
    )
    assert "context length: 256 positions (trained on 64, dynamic x4)" in dynamic.err


def test_readme_trained_model_paths_batch_file_and_sampling_flags(text_workdir, monkeypatch, capsys):
    model_path, vocab_path = text_workdir / "checkpoints" / "model.pt", text_workdir / "data" / "tokenizer.json"
    run_here(text_workdir, monkeypatch, capsys, ["--model_path", str(model_path), "--vocab_path", str(vocab_path)])
    batch = run_here(text_workdir, monkeypatch, capsys, ["--input_file", "examples/prompts.txt"])
    lines = batch.out.strip().split("\n")
    assert len(lines) == 2 and lines[0].startswith("the cat") and lines[1].startswith("这是一个测试：")
    tuned = run_here(
        text_workdir,
        monkeypatch,
        capsys,
        [
            "--prompt",
            "写一个故事：",
            "--max_new_tokens",
            "200",
            "--temperature",
            "0.8",
            "--top_p",
            "0.92",
            "--top_k",
            "40",
            "--repetition_penalty",
            "1.05",
        ],
    )
    assert "temperature 0.8, top_k 40, top_p 0.92, repetition penalty 1.05" in tuned.err
    assert "generated" in tuned.err


def test_readme_simple_moe_maps_vectors_stdin_csv_and_npy(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    model = VectorMoE(
        6, 3, 16, MoEConfig(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16), num_layers=2
    ).eval()
    (tmp_path / "checkpoints").mkdir()
    save_vector_model(model, tmp_path / "checkpoints" / "model.pt")
    rows = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(rows)).output.numpy()

    csv = io.StringIO()
    np.savetxt(csv, rows, delimiter=",", fmt="%.9g")
    monkeypatch.setattr(sys, "stdin", io.StringIO(csv.getvalue()))
    out = run_here(tmp_path, monkeypatch, capsys, ["--model_type", "simple_moe"])  # as the README writes it
    np.testing.assert_allclose(np.loadtxt(io.StringIO(out.out), delimiter=",", ndmin=2), expected, atol=1e-5)
    assert "wrote 5 vectors of 3 features to stdout" in out.err

    np.save(tmp_path / "rows.npy", rows)
    run_here(
        tmp_path,
        monkeypatch,
        capsys,
        ["--model_type", "simple_moe", "--input_file", "rows.npy", "--output_file", "out.npy"],
    )
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-6)
    np.savetxt(tmp_path / "rows.csv", rows[:2], delimiter=",")
    run_here(
        tmp_path,
        monkeypatch,
        capsys,
        ["--model_type", "simple_moe", "--input_file", "rows.csv", "--output_file", "out.csv"],
    )
    assert np.loadtxt(tmp_path / "out.csv", delimiter=",", ndmin=2).shape == (2, 3)
    assert load_vector_model(tmp_path / "checkpoints" / "model.pt").architecture() == model.architecture()

    np.save(tmp_path / "wide.npy", np.zeros((2, 7), dtype=np.float32))
    monkeypatch.chdir(tmp_path)
    assert main(["--model_type", "simple_moe", "--input_file", "wide.npy"]) == 1
    assert "reads rows of 6 features" in capsys.readouterr().err
    save_text_model(tmp_path / "text.pt", MIXTRAL)
    assert main(["--model_type", "simple_moe", "--model_path", "text.pt", "--input_file", "rows.npy"]) == 1
    assert "text.pt is not a vector model file" in capsys.readouterr().err


class RunsCode:
    """A pickle that calls a function when loaded: here it would create a file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_a_pt_file_that_would_run_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    torch.save({"model_state_dict": {"w": torch.ones(2)}, "payload": RunsCode(str(marker))}, tmp_path / "model.pt")
    assert main(["--model_path", str(tmp_path / "model.pt"), "--prompt", "hi"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert not marker.exists()
    assert lines[0].startswith("loading ") and len(lines) == 2  # the progress line, then one line of error
    assert lines[1].startswith("error: ") and "model.pt is refused" in lines[1] and "could run code" in lines[1]


def test_mla_model_with_rope_scaling_from_the_command_line(tmp_path, capsys):
    mla = {
        "attention_type": "mla",
        "q_lora_rank": 16,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 4,
        "v_head_dim": 8,
        **MIXTRAL,
    }  # head_dim 8, rotary head dim 4
    save_text_model(tmp_path / "mla.pt", mla)
    write_tokenizer_json(tmp_path / "tokenizer.json")
    assert (
        main(
            [
                "--model_path",
                str(tmp_path / "mla.pt"),
                "--vocab_path",
                str(tmp_path / "tokenizer.json"),
                "--rope_scaling",
                "yarn:4",
                "--prompt",
                "the cat",
                "--max_new_tokens",
                "5",
            ]
        )
        == 0
    )
    assert "context length: 256 positions" in capsys.readouterr().err


def test_prompt_alone_without_a_model_is_one_clear_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mymoe.generate", "--prompt", "这是一个测试："],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "--model-path ./checkpoints/model.pt (the default) does not exist" in done.stderr


def test_help_imports_no_torch():
    child = (
        "import sys\nfrom mymoe.generate import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch imported' if 'torch' in sys.modules else 'no torch')"
    )
    done = subprocess.run(
        [sys.executable, "-c", child],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr
    assert "--model_type" in done.stdout and done.stdout.strip().endswith("no torch")


def test_hugging_face_folder_with_a_tokenizer_json_and_a_model_trained_with_its_own_scaling(tmp_path, capsys):
    from mymoe.convert.hf import export_hf

    export_hf(our_model(MIXTRAL), tmp_path / "hf")
    write_tokenizer_json(tmp_path / "hf" / "tokenizer.json")  # found beside config.json, no --vocab_path
    assert main(["--model_path", str(tmp_path / "hf"), "--prompt", "the cat", "--max_new_tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("the cat")
    save_text_model(tmp_path / "dynamic.pt", {**MIXTRAL, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    assert (
        main(
            [
                "--model_type",
                "long_transformer_moe",
                "--model_path",
                str(tmp_path / "dynamic.pt"),
                "--vocab_path",
                str(tmp_path / "hf" / "tokenizer.json"),
                "--prompt",
                "the",
                "--max_new_tokens",
                "3",
            ]
        )
        == 0
    )
    assert "context length: 128 positions (trained on 64, dynamic x2)" in capsys.readouterr().err
