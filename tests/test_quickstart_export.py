"""The quickstart's model (configs/tiny.yaml) exports to Hugging Face, and transformers loads the export and
generates what mymoe generates: the README's export-hf command works on the run the quickstart makes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mymoe.config import load_config
from mymoe.convert.hf import export_hf
from mymoe.model import MoECausalLM

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[1]


def tiny_model(seed: int = 0, overrides: tuple[str, ...] = ()) -> MoECausalLM:
    torch.manual_seed(seed)
    model = MoECausalLM(load_config(str(REPO / "configs" / "tiny.yaml"), list(overrides)).model)
    with torch.no_grad():  # weights away from their initial values, as after training
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def test_quickstart_model_exports_and_transformers_generates_the_same(tmp_path):
    model = tiny_model()
    done = export_hf(model, tmp_path / "hf", "auto", None, False)
    assert done["architecture"] == "Qwen2MoeForCausalLM"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
        ours = model.generate(ids[:1], max_new_tokens=16, temperature=0.0)
        theirs = hf.generate(
            ids[:1],
            attention_mask=torch.ones_like(ids[:1]),
            max_new_tokens=16,
            min_new_tokens=16,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert theirs.tolist() == ours.tolist()


@pytest.mark.slow
def test_hf_generate_script_agrees_with_the_checkpoint(tmp_path):
    """scripts/hf_generate.py, the quickstart's last step: transformers on the export against mymoe reading it."""
    spm = pytest.importorskip("sentencepiece")

    model = tiny_model(seed=3, overrides=("--model.vocab_size=200",))  # the tokenizer's size
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"def f{i}(x):\n    return x + {i}" for i in range(400)))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "tok"),
        vocab_size=200,
        model_type="bpe",
        bos_id=-1,
        eos_id=2,
        unk_id=0,
        pad_id=1,
    )
    export_hf(model, tmp_path / "hf", "auto", str(tmp_path / "tok.model"), False)
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "hf_generate.py"),
            str(tmp_path / "hf"),
            "--prompt",
            "def f",
            "--max-new-tokens",
            "12",
            "--reference",
            str(tmp_path / "hf"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "produce the same 12 greedy tokens" in result.stdout
