"""Hugging Face tokenizers end to end: a tokenizer.json built here with `tokenizers` preprocesses to
AutoTokenizer's ids with its own eos as EOD; every family's export carries a tokenizer AutoTokenizer
loads with our ids (from that tokenizer.json, or from a SentencePiece model as a Llama-style fast
tokenizer) and the bos/eos/pad ids, so transformers' generate stops at our eos."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAMILIES = {  # our config fields each family exports from
    "mixtral": {},
    "qwen2_moe": {"qkv_bias": True, "moe": {"n_shared_experts": 1, "shared_expert_gate": True}},
    "qwen3_moe": {"qk_norm": "head"},
    "olmoe": {"qk_norm": "full"},
    "deepseek_v2": {
        "attention_type": "mla",
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8,
        "v_head_dim": 8,
        "moe": {"norm_topk_prob": False},
    },
    "deepseek_v3": {
        "attention_type": "mla",
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8,
        "v_head_dim": 8,
        "moe": {"scoring_func": "sigmoid"},
    },
    "llama": {"first_k_dense_replace": 1},
    "qwen3": {"first_k_dense_replace": 1, "qk_norm": "head"},
}
WORDS = (
    "the river stone light café naïve über Straße 東京 日本語 emoji 😀 🎉 👩‍💻 def return lambda x y "
    "for in range ( ) { } [ ] : ; = + - * / # // -> => \"quoted\" 'single' 42 3.14 1e-5"
).split()


def texts(count: int = 300, seed: int = 0) -> list[str]:
    """Prose, unicode, emoji and code, with indentation, tabs and runs of spaces."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        if i % 3 == 0:
            line = f"def f{i}(x):\n    return x  +  {i}  # {rng.choice(WORDS)}\n"
        elif i % 5 == 0:
            line = "    " + line + "\t" + rng.choice(WORDS)
        elif i % 7 == 0:  # the SentencePiece model's user-defined pieces, kept whole there
            line = f"<|user|> {line} <|assistant|>"
        out.append(line)
    return out


@pytest.fixture(scope="module")
def hf_tokenizer_folder(tmp_path_factory):
    """A byte-level BPE (GPT-2 / Qwen style) with <|endoftext|> as eos, and a folder AutoTokenizer reads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("hf_tokenizer")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts(400, seed=1), trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|pad|>",
                "bos_token": None,
                "clean_up_tokenization_spaces": False,
            }
        )
    )
    return folder


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    from conftest import train_small_tokenizer

    return train_small_tokenizer(tmp_path_factory.mktemp("spm"))


def our_model(family: str, vocab_size: int = 512):
    from mymoe.config import config_from_dict, validate
    from mymoe.model import MoECausalLM

    fields = FAMILIES[family]
    moe = {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, **fields.get("moe", {})}
    torch.manual_seed(0)
    config = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "max_position_embeddings": 64,
        **fields,
        "moe": moe,
    }
    return MoECausalLM(validate(config_from_dict({"model": config})).model).eval()


def test_a_tokenizer_json_gives_autotokenizer_ids_and_its_eos(hf_tokenizer_folder):
    from transformers import AutoTokenizer

    from mymoe.tokenizer import load_tokenizer

    reference = AutoTokenizer.from_pretrained(hf_tokenizer_folder)
    for path in (hf_tokenizer_folder, hf_tokenizer_folder / "tokenizer.json"):
        ours = load_tokenizer(path)
        assert (ours.eos_id(), ours.pad_id(), ours.bos_id()) == (reference.eos_token_id, reference.pad_token_id, -1)
        for text in texts():
            ids = ours.encode(text)
            assert ids == reference(text)["input_ids"]
            assert ours.decode(ids) == reference.decode(ids) == text


def test_preprocess_with_a_tokenizer_json_writes_autotokenizer_ids_and_eos(tmp_path, hf_tokenizer_folder):
    from transformers import AutoTokenizer

    from data_tools.cli import main
    from mymoe.data.indexed import IndexedTokens
    from conftest import write_jsonl

    corpus = texts(300, seed=2)
    write_jsonl(tmp_path / "corpus.jsonl", corpus)
    assert (
        main(
            [
                "preprocess",
                "--input",
                str(tmp_path / "corpus.jsonl"),
                "--tokenizer",
                str(hf_tokenizer_folder),
                "--output",
                str(tmp_path / "out"),
                "--quiet",
            ]
        )
        == 0
    )
    reference = AutoTokenizer.from_pretrained(hf_tokenizer_folder)
    written = IndexedTokens(str(tmp_path / "out"))
    expected = [reference(text)["input_ids"] + [reference.eos_token_id] for text in corpus]
    assert [written.document(i).tolist() for i in range(written.num_documents)] == expected


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["tokenizer_json", "sentencepiece"])
def test_every_export_carries_a_tokenizer_autotokenizer_loads_with_our_ids(
    tmp_path, family, kind, hf_tokenizer_folder, sentencepiece_model
):
    from transformers import AutoTokenizer

    from mymoe.convert.hf import export_hf
    from mymoe.tokenizer import load_tokenizer

    source = str(hf_tokenizer_folder) if kind == "tokenizer_json" else sentencepiece_model
    export_hf(our_model(family), tmp_path / "hf", family, tokenizer=source)
    ours, loaded = load_tokenizer(source), AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in texts(60):
        ids = ours.encode(text)
        assert loaded(text)["input_ids"] == ids, text
        assert loaded.decode(ids) == ours.decode(ids)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert config["eos_token_id"] == generation["eos_token_id"] == ours.eos_id() == loaded.eos_token_id
    if kind == "sentencepiece":
        assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
        assert generation["pad_token_id"] == 2  # no pad piece: pad with the eos


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_transformers_generate_on_an_export_stops_at_our_eos(tmp_path, family, sentencepiece_model):
    from transformers import AutoModelForCausalLM

    from mymoe.convert.hf import export_hf

    model = our_model(family)
    eos = 2  # our </s>; DeepSeek-V3's default eos is 1, Qwen3-MoE has none
    with torch.no_grad():  # after token 7 the model says eos: 7's embedding alone has dimension 0, eos reads it
        model.model.embed_tokens.weight[:, 0] = 0.0
        model.model.embed_tokens.weight[7, 0] = 50.0
        model.lm_head.weight[eos] = 0.0
        model.lm_head.weight[eos, 0] = 10.0
    prompt = torch.tensor([[5, 9, 7]])
    ours = model.generate(prompt, max_new_tokens=8, temperature=0, eos_token_id=eos)[0].tolist()
    assert ours == [5, 9, 7, eos]
    export_hf(model, tmp_path / "hf", family, tokenizer=sentencepiece_model)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert loaded.generate(prompt, max_new_tokens=8, do_sample=False)[0].tolist() == ours  # not 8 new tokens


def test_generate_reads_a_tokenizer_json_folder(tmp_path, capsys, hf_tokenizer_folder):
    from mymoe.convert.hf import export_hf
    from mymoe.generate import main

    export_hf(our_model("mixtral"), tmp_path / "hf", tokenizer=str(hf_tokenizer_folder))
    assert (
        main(
            [
                "--model_path",
                str(tmp_path / "hf"),
                "--prompt",
                "def f(x):",
                "--max_new_tokens",
                "4",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("def f(x):")


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_and_nothing_written(tmp_path, hf_tokenizer_folder):
    from mymoe.checkpoint import CheckpointError
    from mymoe.convert.hf import export_hf

    with pytest.raises(CheckpointError, match="but the model's vocab_size is 64"):
        export_hf(our_model("mixtral", vocab_size=64), tmp_path / "hf", tokenizer=str(hf_tokenizer_folder))
    assert not (tmp_path / "hf").exists()


def test_a_run_fingerprints_the_tokenizer_json_of_a_folder(hf_tokenizer_folder):
    from mymoe.checkpoint.manager import tokenizer_fingerprint
    from mymoe.config import config_from_dict

    config = config_from_dict({"data": {"tokenizer": str(hf_tokenizer_folder)}})
    assert tokenizer_fingerprint(config)["path"] == str(hf_tokenizer_folder / "tokenizer.json")
