"""mymoe-evaluate: the trainer's own evaluation of the same batches, from every checkpoint layout; the MyMoE
design's config trained and evaluated by its two commands; one-line errors and an instant --help."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import REPO, make_dataset, tiny_config, train_in_process, write_dataset

from mymoe.config import load_config
from mymoe.convert.consolidate import consolidate
from mymoe.convert.hf import export_hf
from mymoe.data.indexed import IndexedTokens
from mymoe.evaluate.__main__ import main
from mymoe.evaluate.run import evaluate
from mymoe.load import load_model
from mymoe.tokenizer import load_tokenizer

DESIGN = REPO / "configs" / "mymoe-design.yaml"


def trained(tmp_path, model=None, **moe):
    """(trainer after 3 steps, its checkpoints folder, a validation prefix of 62 samples of 16 tokens)."""
    valid = str(tmp_path / "valid")
    write_dataset(valid, num_tokens=1000, seed=5)
    config = tiny_config(
        tmp_path, max_steps=3, model=model, moe={"bias_update_rate": 0.0, **moe}, train={"eval_steps": 3}
    )
    config.data.valid_prefixes = [valid]
    trainer, _, _ = train_in_process(tmp_path, 3, save_at=(3,), config=config)
    return trainer, tmp_path / "run" / "checkpoints", valid


def test_perplexity_is_the_trainers_evaluation_of_the_same_batches(tmp_path, tokenizer_model):
    # a capacity at evaluation drops tokens, so the loss depends on the batches as well as on the weights
    trainer, checkpoints, valid = trained(tmp_path, capacity_factor=1.0, eval_capacity_factor=1.0)
    trainer_loss = trainer.evaluate()
    results = evaluate(
        str(checkpoints),
        [valid],
        max_batches=trainer.config.train.eval_steps,
        progress=False,
        announce=lambda line: None,
    )
    (result,) = results["datasets"]
    assert (results["step"], results["seq_len"], results["batch_size"]) == (3, 16, 4)  # the run's own
    assert (result["batches"], result["tokens"]) == (3, 3 * 4 * 16)
    assert result["perplexity"] == pytest.approx(math.exp(trainer_loss), rel=1e-6)
    assert result["loss"] == pytest.approx(trainer_loss, rel=1e-6, abs=1e-7)
    with pytest.raises(SystemExit, match="has 400 pieces but the model's vocabulary has 64"):
        main(["--checkpoint", str(checkpoints), "--data", valid, "--tokenizer", tokenizer_model])


def test_every_layout_gives_the_same_numbers_and_every_sample_is_scored_once(tmp_path, capsys, tokenizer_model):
    # dropless, so a Hugging Face export computes the same; a vocabulary that holds the tokenizer's 400 pieces
    _, checkpoints, valid = trained(tmp_path, model={"vocab_size": 512})
    consolidate(checkpoints, tmp_path / "model.safetensors")
    export_hf(load_model(checkpoints)[0], tmp_path / "hf")
    layouts = [checkpoints, checkpoints / "step_00000003", tmp_path / "model.safetensors", tmp_path / "hf"]
    other = str(tmp_path / "other")
    write_dataset(other, num_tokens=600, seed=6)
    runs = []
    for layout in layouts:
        main(
            [
                "--checkpoint",
                str(layout),
                "--data",
                valid,
                other + ".bin",
                "--seq-len",
                "16",
                "--batch-size",
                "4",
                "--tokenizer",
                tokenizer_model,
                "--no-progress",
            ]
        )
        lines = capsys.readouterr().out.strip().splitlines()
        assert lines[0].startswith(f"evaluating {layout}") and lines[1].startswith(f"{valid}: loss ")
        runs.append(json.loads(lines[-1]))
    first = runs[0]
    for run in runs[1:]:
        for mine, theirs in zip(run["datasets"] + [run["overall"]], first["datasets"] + [first["overall"]]):
            assert mine["perplexity"] == pytest.approx(theirs["perplexity"], rel=1e-5)
            assert mine["bits_per_byte"] == pytest.approx(theirs["bits_per_byte"], rel=1e-5)
    valid_result, other_result = first["datasets"]
    # 999 // 16 = 62 samples: 15 batches of 4 and one of 2, every sample once; the second prefix is scored apart
    assert (valid_result["data"], valid_result["batches"], valid_result["tokens"]) == (valid, 16, 62 * 16)
    assert (other_result["data"], other_result["tokens"]) == (other, 599 // 16 * 16)
    # bits per byte: the nats of the scored tokens over the bytes of their text (tokens 1 .. 62 * 16 of the stream)
    text = load_tokenizer(tokenizer_model).decode(IndexedTokens(valid).tokens[1 : 62 * 16 + 1].tolist())
    assert valid_result["bits_per_byte"] == pytest.approx(
        valid_result["loss"] * valid_result["tokens"] / math.log(2) / len(text.encode("utf-8")), rel=1e-12
    )
    overall = first["overall"]
    weighted = (valid_result["loss"] * valid_result["tokens"] + other_result["loss"] * other_result["tokens"]) / (
        valid_result["tokens"] + other_result["tokens"]
    )
    assert overall["tokens"] == valid_result["tokens"] + other_result["tokens"]
    assert overall["loss"] == pytest.approx(weighted, rel=1e-12)
    assert overall["perplexity"] == pytest.approx(math.exp(weighted), rel=1e-12)


def test_the_design_config_has_the_documents_values():
    model = load_config(str(DESIGN)).model
    assert (
        model.vocab_size,
        model.hidden_size,
        model.num_hidden_layers,
        model.num_attention_heads,
        model.num_key_value_heads,
        model.moe.n_routed_experts,
        model.moe.num_experts_per_tok,
    ) == (50304, 768, 12, 4, 2, 2, 1)
    assert model.moe.moe_intermediate_size == 2.0 * model.hidden_size
    assert load_config(str(DESIGN)).data.seq_len == 128


def test_the_design_trains_and_evaluates_with_its_two_commands(tmp_path):
    train_prefix, valid_prefix = make_dataset(tmp_path / "data")
    out_dir = tmp_path / "run"
    shrunk = [
        "--model.vocab_size=64",
        "--model.hidden_size=32",
        "--model.intermediate_size=64",
        "--model.moe.moe_intermediate_size=64",
        "--model.num_hidden_layers=2",
        "--data.seq_len=32",
        f"--data.train_prefixes=[{train_prefix}]",
        f"--data.valid_prefixes=[{valid_prefix}]",
        "--train.max_steps=6",
        "--train.warmup_steps=2",
        "--train.micro_batch_size=4",
        "--train.eval_interval=6",
        "--train.eval_steps=2",
        f"--train.out_dir={out_dir}",
    ]
    trained = subprocess.run(
        [sys.executable, "-m", "mymoe.train", "--config", str(DESIGN), "--no-progress", *shrunk],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    logged = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    trainer_perplexity = next(record["eval/perplexity"] for record in logged if "eval/perplexity" in record)

    evaluated = subprocess.run(
        [
            sys.executable,
            "-m",
            "mymoe.evaluate",
            "--checkpoint",
            str(out_dir / "checkpoints"),
            "--data",
            valid_prefix,
            "--max-batches",
            "2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    results = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert results["overall"]["perplexity"] == pytest.approx(trainer_perplexity, rel=1e-6)
    assert results["datasets"][0]["tokens"] == 2 * 4 * 32
    assert f"{valid_prefix}: loss " in evaluated.stdout and valid_prefix in evaluated.stderr  # line and progress bar


def one_line_error(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "mymoe.evaluate", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and not done.stdout
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    return done.stderr


def test_missing_inputs_are_one_line_errors_before_any_model_is_loaded(tmp_path):
    write_dataset(str(tmp_path / "valid"), num_tokens=100)
    assert "--checkpoint nowhere does not exist" in one_line_error("--checkpoint", "nowhere", "--data", "x")
    assert f"{tmp_path}/nothing.bin and {tmp_path}/nothing.idx not found" in one_line_error(
        "--checkpoint", str(tmp_path), "--data", str(tmp_path / "valid"), str(tmp_path / "nothing")
    )
    assert "no committed checkpoint under" in one_line_error(
        "--checkpoint", str(tmp_path), "--data", str(tmp_path / "valid")
    )


def test_help_does_not_import_torch():
    probe = (
        "import sys\nfrom mymoe.evaluate.__main__ import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n"
        "    pass\nprint('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().splitlines()[-1] == "False" and "--max-batches" in done.stdout
