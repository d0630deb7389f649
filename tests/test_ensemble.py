"""The sample-level gated ensemble (mymoe.ensemble): the routing rule and the probability mix against plain
references, skipped members not run, cached generation equal to recomputing, a folder that round-trips and
refuses members that cannot be mixed; and the must-show: two members trained on Python source and on English
prose, whose trained gate sends held-out samples of each kind to their member and whose mix beats each alone.
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path
from typing import Iterable

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    SHARED_CORPUS,
    TINY_CONFIG,
    documents,
    run_preprocess,
    train_in_process,
    write_dataset,
    write_jsonl,
)

from data_tools.corpus import resolve_inputs
from data_tools.tokenizer import TokenizerOptions, check_tokenizer_options, train_tokenizer

from mymoe.config import (
    ConfigError,
    EnsembleConfig,
    PEFTConfig,
    config_from_dict,
    load_config,
    validate,
    validate_ensemble,
)
from mymoe.checkpoint import CheckpointError
from mymoe.ensemble.commands import main
from mymoe.ensemble.folder import build_ensemble, load_ensemble, save_weights
from mymoe.ensemble.gate import SampleGate, gate_model_config, last_real_position, route
from mymoe.ensemble.model import GatedEnsemble
from mymoe.model import MoECausalLM


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and far faster than on threads that fight for shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SMALL = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "moe": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
}


def small_member(folder: Path, name: str, seed: int, **fields) -> str:
    """A random small model saved as a .pt file mymoe.load reads; its path."""
    torch.manual_seed(seed)
    config = validate(config_from_dict({"model": {**SMALL, **fields}, "data": {"seq_len": 16}}))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.pt"
    torch.save({"model_state_dict": MoECausalLM(config.model).state_dict(), "config": config.to_dict()}, path)
    return str(path)


def small_ensemble(threshold: float = 0.0, members: int = 2) -> GatedEnsemble:
    models = []
    for seed in range(members):
        torch.manual_seed(seed)
        models.append(MoECausalLM(validate(config_from_dict({"model": SMALL})).model).eval())
    gate = SampleGate(gate_model_config(64, 32, 1, 4, 64), members)
    torch.nn.init.normal_(gate.to_members.weight, std=1.0)  # a gate with opinions (it starts uniform)
    return GatedEnsemble(models, gate, threshold).eval()


def test_route_keeps_the_members_above_the_threshold_and_always_the_top_one():
    logits = torch.tensor([[2.0, 1.0, -3.0], [0.0, 0.0, 0.0], [0.1, 5.0, 0.0]])
    probs = logits.softmax(-1)
    weights = route(logits, threshold=0.34)
    assert torch.equal(weights > 0, torch.tensor([[True, False, False], [True, False, False], [False, True, False]]))
    assert weights[1].tolist() == [1.0, 0.0, 0.0]  # a tie below the threshold: the top one (the first) is kept
    weights = route(logits, threshold=0.2)
    expected = probs[0, :2] / probs[0, :2].sum()
    assert torch.allclose(weights[0, :2], expected) and weights[0, 2] == 0
    assert torch.allclose(route(logits, 0.0), probs)
    assert torch.allclose(route(logits, 0.3).sum(-1), torch.ones(3))


def test_last_real_position_under_left_and_right_padding():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert last_real_position(mask).tolist() == [3, 2, 3, 0]


def test_the_output_mixes_probabilities_and_skipped_members_do_not_run():
    torch.manual_seed(0)
    ensemble = small_ensemble(threshold=0.0, members=3).requires_grad_(False)
    input_ids = torch.randint(0, 64, (4, 10))
    labels = torch.randint(0, 64, (4, 10))
    output = ensemble(input_ids, labels)
    probs = [F.softmax(member(input_ids).logits.float(), -1) for member in ensemble.members]
    mixed = sum(output.weights[:, m, None, None] * probs[m] for m in range(3))  # [B, S, V]
    assert torch.allclose(output.log_probs.exp(), mixed, atol=1e-6)
    assert float(output.lm_loss) == pytest.approx(float(-mixed.gather(-1, labels[..., None]).log().mean()), rel=1e-5)

    ensemble.threshold = 0.9  # each sample now has only its top member
    rows_seen = [0, 0, 0]
    for index, member in enumerate(ensemble.members):
        member.register_forward_hook(lambda module, inputs, out, i=index: rows_seen.__setitem__(i, len(inputs[0])))
    output = ensemble(input_ids)
    top = output.weights.argmax(1)
    assert rows_seen == torch.bincount(top, minlength=3).tolist()
    for row in range(4):
        alone = F.log_softmax(ensemble.members[int(top[row])](input_ids[row : row + 1]).logits.float(), -1)
        assert torch.allclose(output.log_probs[row], alone[0], atol=1e-5)


def test_cached_generation_is_the_greedy_argmax_of_the_mix_and_padding_changes_nothing():
    torch.manual_seed(1)
    ensemble = small_ensemble(threshold=0.3)
    prompt = torch.randint(0, 64, (1, 5))
    generated = ensemble.generate(prompt, 6, temperature=0.0)
    tokens = prompt
    for _ in range(6):  # no cache: the whole sequence again each step, with the routing of the prompt
        weights = ensemble.routing(prompt)
        next_token = ensemble.mix(tokens, None, weights)[:, -1].argmax(-1)
        tokens = torch.cat((tokens, next_token[:, None]), 1)
    assert torch.equal(generated, tokens)

    other = torch.randint(0, 64, (1, 3))
    padded = torch.cat((torch.zeros(1, 2, dtype=torch.long), other), 1)
    batch = torch.cat((prompt, padded))
    mask = torch.ones_like(batch)
    mask[1, :2] = 0
    together = ensemble.generate(batch, 6, temperature=0.0, attention_mask=mask)
    assert torch.equal(together[0], generated[0])
    assert torch.equal(together[1, 2:], ensemble.generate(other, 6, temperature=0.0)[0])
    sampled = ensemble.generate(prompt, 6, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(0))
    again = ensemble.generate(prompt, 6, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, again) and sampled.shape == (1, 11)


def test_a_folder_round_trips_with_adapters_and_the_gate_owns_the_averaged_embedding(tmp_path):
    members = [small_member(tmp_path, "a", 0), small_member(tmp_path, "b", 1)]
    settings = EnsembleConfig(threshold=0.2, lm_loss_weight=1.0, peft=PEFTConfig(lora_rank=2))
    manifest = build_ensemble(members, tmp_path / "ens", settings, announce=lambda line: None)
    assert manifest["members"] == [str(Path(m).resolve()) for m in members]
    assert sorted(os.listdir(tmp_path / "ens")) == ["adapters.safetensors", "gate.safetensors", "manifest.json"]
    ensemble, _ = load_ensemble(tmp_path / "ens")
    average = (ensemble.members[0].model.embed_tokens.weight + ensemble.members[1].model.embed_tokens.weight) / 2
    assert torch.allclose(ensemble.gate.body.embed_tokens.weight, average)
    assert ensemble.gate.body.embed_tokens.weight.data_ptr() not in {
        m.model.embed_tokens.weight.data_ptr() for m in ensemble.members
    }
    trainable = {name for name, p in ensemble.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("gate.") or ".lora_" in name for name in trainable)
    assert any(".lora_" in name for name in trainable)

    with torch.no_grad():  # as if trained: the loaded folder must give these weights back
        for param in ensemble.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    save_weights(ensemble, manifest, tmp_path / "ens")
    again, _ = load_ensemble(tmp_path / "ens")
    input_ids = torch.randint(0, 64, (3, 8))
    assert torch.allclose(ensemble.eval()(input_ids).log_probs, again.eval()(input_ids).log_probs, atol=1e-6)
    assert not [name for name in os.listdir(tmp_path / "ens") if ".partial-" in name]


def test_train_gate_with_adapters_trains_the_gate_and_the_adapters_only(tmp_path, capsys):
    members = [small_member(tmp_path, "a", 0), small_member(tmp_path, "b", 1)]
    write_dataset(str(tmp_path / "data"), num_tokens=2000)
    ensemble = str(tmp_path / "ens")
    flags = ["--lora-rank", "2", "--lm-loss-weight", "1.0", "--gate-layers", "0"]
    assert main(["build", "--members", *members, "--out", ensemble, *flags]) == 0
    before, _ = load_ensemble(ensemble)
    capsys.readouterr()
    assert main(["train-gate", "--ensemble", ensemble, "--data", str(tmp_path / "nothing")]) == 1
    assert "nothing.idx does not exist" in capsys.readouterr().err
    assert main(["train-gate", "--ensemble", ensemble, "--data", str(tmp_path / "data"), "--steps", "3"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["gate_steps"] == 3 and 0 <= summary["routing_accuracy"] <= 1
    after, manifest = load_ensemble(ensemble)
    assert manifest["gate_steps"] == 3
    old, new = dict(before.named_parameters()), dict(after.named_parameters())
    changed = {name for name in new if not torch.equal(old[name], new[name])}
    assert any(name.startswith("gate.") for name in changed) and any(".lora_B" in name for name in changed)
    assert all(name.startswith("gate.") or ".lora_" in name for name in changed)
    logged = (Path(ensemble) / "gate_training" / "metrics.jsonl").read_text().splitlines()
    assert "gate/ensemble_lm_loss" in json.loads(logged[-1])


def test_members_that_cannot_be_mixed_and_bad_settings_are_refused_before_any_write(tmp_path, capsys):
    a = small_member(tmp_path, "a", 0)
    wider = small_member(tmp_path, "wider", 1, vocab_size=80)
    with pytest.raises(CheckpointError, match="members differ in vocab_size: .* has 64, .* has 80; the ensemble mixes"):
        build_ensemble([a, wider], tmp_path / "ens", EnsembleConfig(), announce=lambda line: None)
    with pytest.raises(CheckpointError, match="an ensemble needs two or more"):
        build_ensemble([a], tmp_path / "ens", EnsembleConfig(), announce=lambda line: None)
    assert not (tmp_path / "ens").exists()
    with pytest.raises(ConfigError, match=r"threshold=1.5 must be in \[0, 1\)"):
        validate_ensemble(EnsembleConfig(threshold=1.5))
    with pytest.raises(ConfigError, match="gate_heads=5 must divide the members' hidden_size=32"):
        validate_ensemble(EnsembleConfig(gate_heads=5), hidden_size=32)
    with pytest.raises(ConfigError, match="lm_loss_weight=0 leaves them untrained"):
        validate_ensemble(EnsembleConfig(peft=PEFTConfig(prefix_length=2)))
    assert main(["build", "--members", a, wider, "--out", str(tmp_path / "ens")]) == 1
    assert "error: members differ in vocab_size" in capsys.readouterr().err
    assert main(["evaluate", "--ensemble", str(tmp_path), "--data", "x"]) == 1
    assert "is not an ensemble folder (manifest.json is missing)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# the must-show: a code member and a prose member, a gate trained to tell their samples apart

STDLIB = Path(os.__file__).parent  # the Python source of the standard library (/usr/lib/python3.11)
CHUNK = 1500  # characters per document
MEMBER_STEPS = 120
GATE_STEPS = 80


def chunks(texts: Iterable[str], limit: int) -> list[str]:
    """Documents of CHUNK characters cut from texts, `limit` characters in all."""
    out = []
    for text in texts:
        out += [text[i : i + CHUNK] for i in range(0, len(text) - CHUNK, CHUNK)]
        if len(out) * CHUNK >= limit:
            break
    return out[: limit // CHUNK]


def code_only(source: str) -> str:
    """Python source without its comments and docstrings: the English in them would blur code and prose."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
        ):
            node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def two_corpora() -> dict[str, tuple[list[str], list[str]]]:
    """{"code": (train, valid), "prose": (train, valid)}: held-out documents from other files than training's."""
    sources = [path for path in sorted(STDLIB.glob("*.py")) if path.stat().st_size > 20_000]
    books = sorted(SHARED_CORPUS.glob("*.txt")) if SHARED_CORPUS.is_dir() else []
    if len(books) >= 2:
        prose = [path.read_text(errors="replace")[20_000:] for path in books]  # past the front matter
    else:  # no shared corpus here: English-like sentences made on the spot
        prose = ["\n".join(documents(seed, 200)) for seed in range(20)]
    return {  # code is read lazily: chunks stops reading once it has enough
        "code": (
            chunks((code_only(path.read_text()) for path in sources[::2]), 150_000),
            chunks((code_only(path.read_text()) for path in sources[1::2]), 30_000),
        ),
        "prose": (chunks(prose[::2], 150_000), chunks(prose[1::2], 30_000)),
    }


def shared_tokenizer(folder: Path, corpora: dict) -> str:
    texts = [doc for train, _ in corpora.values() for doc in train[:40]]
    options = TokenizerOptions(
        inputs=[str(write_jsonl(folder / "tokenizer.jsonl", texts))],
        output=str(folder / "tok"),
        vocab_size=512,
        num_threads=1,
        progress=False,
    )
    check_tokenizer_options(options)
    return train_tokenizer(options, resolve_inputs(options.inputs)).model_path


def member_config(data: str, tokenizer: str, out_dir: Path, steps: int):
    overrides = {
        "model.vocab_size": 512,
        "data.seq_len": 64,
        "data.train_prefixes": f"[{data}]",
        "data.tokenizer": tokenizer,
        "train.max_steps": steps,
        "train.micro_batch_size": 8,
        "train.eval_interval": 0,
        "train.precision": "fp32",
        "train.out_dir": str(out_dir),
    }
    return load_config(str(TINY_CONFIG), [f"--{key}={value}" for key, value in overrides.items()])


@pytest.mark.slow
def test_the_gate_routes_code_and_prose_to_their_members_and_the_mix_beats_each(tmp_path, capsys):
    corpora = two_corpora()
    tokenizer = shared_tokenizer(tmp_path, corpora)
    prefixes = {}
    for kind, (train, valid) in corpora.items():
        for split, texts in (("train", train), ("valid", valid)):
            run_preprocess(
                [write_jsonl(tmp_path / f"{kind}_{split}.jsonl", texts)], tmp_path / f"{kind}_{split}", tokenizer
            )
            prefixes[kind, split] = str(tmp_path / f"{kind}_{split}")
    members = []
    for kind in ("code", "prose"):
        config = member_config(prefixes[kind, "train"], tokenizer, tmp_path / kind, MEMBER_STEPS)
        train_in_process(tmp_path / kind, MEMBER_STEPS, save_at=(MEMBER_STEPS,), config=config)
        members.append(str(tmp_path / kind / "checkpoints"))

    ensemble = str(tmp_path / "ensemble")
    assert main(["build", "--members", *members, "--out", ensemble]) == 0
    train_data = [prefixes["code", "train"], prefixes["prose", "train"]]
    assert (
        main(["train-gate", "--ensemble", ensemble, "--data", *train_data, "--steps", str(GATE_STEPS), "--no-progress"])
        == 0
    )
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trained["gate_steps"] == GATE_STEPS
    logged = [
        json.loads(line) for line in (Path(ensemble) / "gate_training" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [record["step"] for record in logged] == list(range(1, GATE_STEPS + 1))

    valid = [prefixes["code", "valid"], prefixes["prose", "valid"]]
    assert (
        main(
            [
                "evaluate",
                "--ensemble",
                ensemble,
                "--data",
                *valid,
                "--labels",
                "0",
                "1",
                "--max-batches",
                "12",
                "--no-progress",
            ]
        )
        == 0
    )
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    code, prose = results["datasets"]
    overall = results["overall"]  # the mixed held-out set: both kinds together
    assert code["routing_accuracy"] > 0.9 and prose["routing_accuracy"] > 0.9
    assert overall["ensemble_loss"] < min(overall["member_loss"])
    assert code["member_loss"][0] < code["member_loss"][1] and prose["member_loss"][1] < prose["member_loss"][0]

    # routed from the first half of each sample only, as a prompt is: the mix still beats each member
    evaluate = ["evaluate", "--ensemble", ensemble, "--data", *valid, "--labels", "0", "1", "--max-batches", "12"]
    assert main([*evaluate, "--gate-tokens", "32", "--no-progress"]) == 0
    from_prompt = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert from_prompt["overall"]["ensemble_loss"] < min(from_prompt["overall"]["member_loss"])

    assert main(["generate", "--ensemble", ensemble, "--prompt", "def main(", "--max-new-tokens", "8"]) == 0
    generated = capsys.readouterr()
    assert generated.out.startswith("def main(") and "was routed to member" in generated.err
    print(
        f"RESULT ensemble routing accuracy: code {code['routing_accuracy']:.3f}, prose {prose['routing_accuracy']:.3f}"
    )
    print(
        f"RESULT mixed held-out loss: ensemble {overall['ensemble_loss']:.4f}, code member "
        f"{overall['member_loss'][0]:.4f}, prose member {overall['member_loss'][1]:.4f}"
    )
    first_half = from_prompt["overall"]
    print(
        f"RESULT gate reading the first 32 of 64 tokens: routing accuracy code "
        f"{from_prompt['datasets'][0]['routing_accuracy']:.3f}, prose {from_prompt['datasets'][1]['routing_accuracy']:.3f}; "
        f"mixed held-out loss: ensemble {first_half['ensemble_loss']:.4f}, code member "
        f"{first_half['member_loss'][0]:.4f}, prose member {first_half['member_loss'][1]:.4f}"
    )
