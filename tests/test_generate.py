"""`python -m mymoe.generate` on a checkpoint saved with EP=2 on two ranks: all experts in one process,
the same text for the same seed, streamed or not, and the same tokens as model.generate."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import run_layout


@pytest.fixture(scope="module")
def ep2_checkpoint_and_tokenizer(tmp_path_factory):
    import sentencepiece as spm

    workdir = tmp_path_factory.mktemp("generate")
    text = workdir / "corpus.txt"
    text.write_text(
        "\n".join(
            f"the {animal} saw {count} birds near the river"
            for animal in ("cat", "dog", "fox", "owl", "bee")
            for count in range(20)
        )
    )
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(workdir / "tok"),
        vocab_size=48,
        model_type="bpe",
        eos_id=1,
        bos_id=-1,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    run_layout(workdir, world_size=2, expert_parallel_size=2, stop_at=2, save_at=(2,))
    return workdir / "run" / "checkpoints", workdir / "tok.model"


def generate(checkpoint, tokenizer, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "mymoe.generate",
        "--checkpoint",
        str(checkpoint),
        "--vocab_path",
        str(tokenizer),
        "--prompt",
        "the cat",
        "--max_new_tokens",
        "12",
        "--temperature",
        "0.8",
        "--top_k",
        "50",
        "--top_p",
        "0.9",
        *extra,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.slow
def test_generate_from_an_ep2_checkpoint_is_deterministic(ep2_checkpoint_and_tokenizer):
    checkpoint, tokenizer = ep2_checkpoint_and_tokenizer
    first = generate(checkpoint, tokenizer, "--seed", "0")
    again = generate(checkpoint, tokenizer, "--seed", "0", "--no_stream")
    other = generate(checkpoint, tokenizer, "--seed", "1", "--step", "2")
    assert first.stdout.startswith("the cat") and len(first.stdout.strip()) > len("the cat")
    assert first.stdout == again.stdout  # streamed or printed at the end: the same text
    assert other.stdout != first.stdout
    assert "saved at EP 2" in first.stderr and "generated" in first.stderr


@pytest.mark.slow
def test_streamed_sampling_equals_model_generate(ep2_checkpoint_and_tokenizer):
    from mymoe.load import load_model
    from mymoe.inference import sample_tokens

    checkpoint, _ = ep2_checkpoint_and_tokenizer
    model, config, _ = load_model(checkpoint)
    assert all(layer.experts.num_experts == config.model.moe.n_routed_experts for layer in model.iter_moe_layers())
    prompt = torch.tensor([[1, 5, 9, 7]])
    streamed = list(sample_tokens(model, prompt, 10, 0.8, 50, 0.9, 1.0, torch.Generator().manual_seed(3), None))
    reference = model.generate(
        prompt, 10, temperature=0.8, top_k=50, top_p=0.9, generator=torch.Generator().manual_seed(3)
    )
    assert streamed == reference[0, 4:].tolist()


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mymoe.generate",
            "--checkpoint",
            str(tmp_path / "nothing"),
            "--vocab_path",
            "tok.model",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "nothing does not exist: give a run's checkpoints folder" in done.stderr
