"""Helpers shared by the test modules (tests import them with `from conftest import ...`) and the
session-wide fixtures. Functions that spawned ranks run live at module level here, so the children can
import them.

    datasets      a tiny learnable token dataset (.bin/.idx) and a shortened configs/tiny.yaml for it
    checkpoints   a tiny config over random tokens, and training to a step in one process or on N ranks
    hf            small models of each Hugging Face architecture family
    data_tools    corpora made on the spot, one small tokenizer per session, a quiet preprocess call
"""

from __future__ import annotations

import json
import os
import random
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from data_tools.corpus import resolve_inputs
from data_tools.preprocess import PreprocessOptions, preprocess
from data_tools.tokenizer import TokenizerOptions, check_tokenizer_options, train_tokenizer
from dist_utils import run_distributed
from mymoe.checkpoint import CheckpointManager, expert_checksums, read_manifest
from mymoe.config import config_from_dict, validate
from mymoe.model import MoECausalLM
from mymoe.parallel import ParallelContext, init_distributed, shutdown
from mymoe.train.loop import Trainer

# ---------------------------------------------------------------------------------------------------
# datasets: the documents follow a fixed random bigram chain over the first ACTIVE_TOKENS ids (each has one
# successor, chosen once), so a model that learns the chain drives its loss from ln(vocab) ~ 6.9 towards
# 0 within a few dozen steps: "the loss fell" is a property of the trainer, not of luck.

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
ACTIVE_TOKENS = 48  # of configs/tiny.yaml's 1024


def write_indexed(prefix: Path, documents: list[np.ndarray]) -> str:
    """Write documents (1-D int arrays) as prefix.bin/.idx with megatron-core's builder."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron.core warns that Transformer Engine and Apex are missing
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for document in documents:
        builder.add_document(np.asarray(document, dtype=np.uint16), [len(document)])
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


def bigram_documents(count: int, length: int, seed: int) -> list[np.ndarray]:
    """Documents walking one fixed successor table (the same for every seed) from random starts."""
    successor = np.random.default_rng(0).permutation(ACTIVE_TOKENS)
    rng = np.random.default_rng(seed)
    documents = []
    for _ in range(count):
        tokens = np.empty(length, dtype=np.int64)
        tokens[0] = rng.integers(ACTIVE_TOKENS)
        for i in range(1, length):
            tokens[i] = successor[tokens[i - 1]]
        documents.append(tokens)
    return documents


def make_dataset(folder: Path) -> tuple[str, str]:
    """(train prefix, valid prefix) of a small bigram corpus under folder."""
    train = write_indexed(folder / "bigram_train", bigram_documents(64, 257, seed=1))
    valid = write_indexed(folder / "bigram_valid", bigram_documents(8, 257, seed=2))
    return train, valid


def tiny_overrides(
    train_prefix: str, valid_prefix: str, out_dir: Path, steps: int = 20, extra: dict | None = None
) -> list[str]:
    """Command-line overrides that shorten configs/tiny.yaml to a test-sized run; extra adds or replaces
    dotted keys ({"parallel.expert_parallel_size": 2})."""
    values = {
        "data.train_prefixes": f"[{train_prefix}]",
        "data.valid_prefixes": f"[{valid_prefix}]",
        "train.max_steps": steps,
        "train.warmup_steps": 2,
        "train.micro_batch_size": 4,
        "train.eval_interval": steps,
        "train.eval_steps": 1,
        "train.out_dir": str(out_dir),
    }
    values.update(extra or {})
    return [f"--{key}={value}" for key, value in values.items()]


def python() -> str:
    return sys.executable


# ---------------------------------------------------------------------------------------------------
# checkpoints

GLOBAL_BATCH = 4  # samples per step on every layout: micro_batch_size = GLOBAL_BATCH / world_size


def write_dataset(prefix: str, num_tokens: int = 4000, vocab_size: int = 64, seed: int = 0) -> None:
    """A Megatron .bin/.idx pair of random uint16 tokens in four documents."""
    tokens = np.random.default_rng(seed).integers(0, vocab_size, num_tokens).astype(np.uint16)
    lengths = np.full(4, num_tokens // 4, dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1]) * 2]).astype(np.int64)
    tokens[: int(lengths.sum())].tofile(prefix + ".bin")
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + np.uint64(1).tobytes() + np.uint8(8).tobytes())
        f.write(np.uint64(len(lengths)).tobytes() + np.uint64(len(lengths) + 1).tobytes())
        f.write(lengths.tobytes() + pointers.tobytes() + np.arange(len(lengths) + 1, dtype=np.int64).tobytes())


def tiny_config(
    workdir,
    world_size: int = 1,
    expert_parallel_size: int = 1,
    max_steps: int = 6,
    model: dict | None = None,
    moe: dict | None = None,
    train: dict | None = None,
):
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "data.bin").exists():
        write_dataset(str(workdir / "data"))
    config = config_from_dict(
        {
            "model": {
                "vocab_size": 64,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                **(model or {}),
                "moe": {
                    "n_routed_experts": 4,
                    "num_experts_per_tok": 2,
                    "moe_intermediate_size": 32,
                    "bias_update_rate": 0.01,
                    "router_aux_loss_coef": 0.0,
                    **(moe or {}),
                },
            },
            "parallel": {"expert_parallel_size": expert_parallel_size, "backend": "gloo"},
            "train": {
                "max_steps": max_steps,
                "micro_batch_size": GLOBAL_BATCH // world_size,
                "eval_interval": 0,
                "warmup_steps": 2,
                "precision": "fp32",
                "keep_last": 10,
                "out_dir": str(workdir / "run"),
                **(train or {}),
            },
            "data": {"train_prefixes": [str(workdir / "data")], "seq_len": 16},
        }
    )
    return validate(config)


def train_worker(rank, world_size, workdir, expert_parallel_size, stop_at, save_at, config_overrides):
    """Resume from workdir/run/checkpoints if there is a checkpoint, train to `stop_at`, saving at `save_at`."""
    config = tiny_config(workdir, world_size, expert_parallel_size, max_steps=stop_at, **config_overrides)
    ctx = init_distributed(config)
    try:
        trainer = Trainer(config, ctx)
        manager = CheckpointManager(Path(config.train.out_dir) / "checkpoints", config, ctx, verbose=False)
        held = None
        if manager.load_latest(trainer):
            saved = read_manifest(manager.latest())["expert_checksums"]
            held = {
                name: {expert: crc == saved[name][expert] for expert, crc in sums.items()}
                for name, sums in expert_checksums(trainer.model).items()
            }
        losses = train_until(trainer, manager, stop_at, save_at)
        return {
            "losses": losses,
            "held": held,
            "reader": trainer.train_reader.state_dict(),
            "first_expert": [layer.experts.first_expert for layer in trainer.model.iter_moe_layers()],
        }
    finally:
        shutdown()


def run_layout(workdir, world_size, expert_parallel_size, stop_at, save_at=(), config_overrides=None):
    results = run_distributed(
        train_worker,
        world_size,
        args=(str(workdir), expert_parallel_size, stop_at, tuple(save_at), config_overrides or {}),
        init_process_group=False,
        timeout=90,
    )
    return [r.value for r in results]


def train_in_process(workdir, stop_at, save_at=(), config=None):
    """Single process, no process group: (trainer, manager, losses)."""
    config = config or tiny_config(workdir, max_steps=stop_at)
    trainer = Trainer(config, ParallelContext())
    manager = CheckpointManager(Path(config.train.out_dir) / "checkpoints", config, ParallelContext(), verbose=False)
    manager.load_latest(trainer)
    return trainer, manager, train_until(trainer, manager, stop_at, save_at)


def train_until(trainer, manager, stop_at, save_at) -> list[float]:
    """Train to step `stop_at`, saving at the steps in `save_at`; the losses of the steps taken."""
    losses = []
    while trainer.step < stop_at:
        losses.append(trainer.train_step()["loss"])
        if trainer.step in save_at:
            manager.save(trainer)
    manager.wait()
    return losses


# ---------------------------------------------------------------------------------------------------
# hf: a small model per architecture family, with norms and biases that would show a swapped tensor

BASE = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rope_theta": 500.0,
}
MIXTRAL = {"moe": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24}}
QWEN = {
    "first_k_dense_replace": 1,
    "tie_word_embeddings": True,
    "moe": {
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 24,
        "n_shared_experts": 1,
        "shared_expert_intermediate_size": 40,
        "shared_expert_gate": True,
        "norm_topk_prob": False,
    },
}


def our_model(fields: dict, seed: int = 0) -> MoECausalLM:
    torch.manual_seed(seed)
    model = MoECausalLM(validate(config_from_dict({"model": {**BASE, **fields}})).model)
    with torch.no_grad():  # norms away from 1, so a swapped norm would show
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                param.uniform_(0.5, 1.5)
        for layer in model.iter_moe_layers():  # a balancing bias that changes which experts are chosen
            if model.config.moe.scoring_func == "sigmoid":
                layer.gate.expert_bias.uniform_(-0.05, 0.05)
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# data_tools: tokenizers are tiny (vocab 400, a few hundred lines) so that training one takes about a second

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_CORPUS = REPO_ROOT.parent / "shared" / "data" / "corpus"
WORDS = (
    "the a river stone light house garden winter morning letter window quiet old young she he "
    "walked said found looked under over through and but because while when never always small "
    "bright dark table story friend mother father road city field evening before after"
).split()
SPECIAL_TOKENS = ["<|user|>", "<|assistant|>"]


def sentences(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))).capitalize() + "." for _ in range(count)]


def documents(seed: int, count: int) -> list[str]:
    """`count` documents of 1-5 lines, some with indentation and non-ASCII text."""
    rng = random.Random(seed)
    lines = sentences(seed, count * 5)
    docs = []
    for i in range(count):
        body = "\n".join(lines[i * 5 : i * 5 + rng.randint(1, 5)])
        if i % 7 == 3:
            body += "\n    indented(x) -> café, naïve, 日本"
        docs.append(body)
    return docs


def write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    path.write_text("".join(json.dumps({key: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def write_txt_files(folder: Path, texts: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, text in enumerate(texts):
        path = folder / f"doc{i:04d}.txt"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def train_small_tokenizer(folder: Path, normalization: str = "identity") -> str:
    corpus = write_jsonl(folder / "tokenizer_corpus.jsonl", documents(seed=99, count=300))
    options = TokenizerOptions(
        inputs=[str(corpus)],
        output=str(folder / f"tok_{normalization}"),
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        normalization=normalization,
        num_threads=1,
        progress=False,
    )
    check_tokenizer_options(options)
    return train_tokenizer(options, resolve_inputs(options.inputs)).model_path


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory) -> str:
    return train_small_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def nfkc_tokenizer_model(tmp_path_factory) -> str:
    """A tokenizer that drops control characters, so some documents tokenize to nothing."""
    return train_small_tokenizer(tmp_path_factory.mktemp("tokenizer_nfkc"), "nmt_nfkc")


def run_preprocess(inputs, output, tokenizer, **settings):
    options = PreprocessOptions(
        inputs=[str(p) for p in inputs],
        output=str(output),
        tokenizer=tokenizer,
        progress=False,
        **settings,
    )
    return preprocess(options, announce=lambda line: None)


def pair_bytes(prefix) -> tuple[bytes, bytes]:
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


def megatron_documents(prefix) -> list[list[int]]:
    """Every document of a pair, read by megatron-core's own IndexedDataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix), mmap=True)
    indices = dataset.document_indices
    docs = []
    for d in range(len(indices) - 1):
        pieces = [dataset[s] for s in range(indices[d], indices[d + 1])]
        docs.append(np.concatenate(pieces).tolist() if pieces else [])
    return docs


def leftover_staging(folder) -> list[str]:
    return [name for name in os.listdir(folder) if ".partial-" in name]
