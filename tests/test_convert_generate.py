"""mymoe.generate with --model_path, --input_file batching and --rope_scaling at inference."""

from __future__ import annotations

import torch

from conftest import MIXTRAL, our_model
from mymoe.convert.cli import parse_args as convert_parse_args
from mymoe.generate import main, parse_args, parse_rope_scaling
from mymoe.inference import apply_rope_scaling, left_padded_batch


def test_left_padded_batch_gives_each_prompt_its_greedy_tokens():
    model = our_model(MIXTRAL)
    prompts = [[1, 5, 9], [1, 7, 3, 12, 40, 2, 8], [1, 22]]
    input_ids, attention_mask = left_padded_batch(prompts)
    batched = model.generate(input_ids, 8, temperature=0, attention_mask=attention_mask)[:, input_ids.shape[1] :]
    for row, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt]), 8, temperature=0)[0, len(prompt) :]
        assert batched[row].tolist() == alone.tolist()


def test_yarn_at_inference_runs_a_prompt_four_times_the_trained_length():
    model = our_model(MIXTRAL)  # max_position_embeddings=64
    apply_rope_scaling(model, parse_rope_scaling("yarn:4"))
    prompt = torch.arange(256).remainder(64)[None]
    out = model.generate(prompt, 4, temperature=0)
    assert out.shape == (1, 260)
    with torch.no_grad():
        assert torch.isfinite(model(prompt).logits).all()
    assert model.model.rotary_emb.attention_scaling > 1  # YaRN's sharpening is on


def test_cli_model_path_input_file(tmp_path, capsys):
    import sentencepiece as spm

    from mymoe.convert.hf import export_hf

    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"the {a} saw {n} birds" for a in ("cat", "dog", "owl") for n in range(20)))
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(tmp_path / "tok"),
        vocab_size=40,
        model_type="bpe",
        eos_id=1,
        bos_id=-1,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    export_hf(our_model(MIXTRAL), tmp_path / "hf", tokenizer=str(tmp_path / "tok.model"))
    (tmp_path / "prompts.txt").write_text("the cat\nthe dog saw many\n")
    assert (
        main(
            [
                "--model_path",
                str(tmp_path / "hf"),
                "--input_file",
                str(tmp_path / "prompts.txt"),
                "--temperature",
                "0",
                "--max_new_tokens",
                "5",
                "--rope_scaling",
                "dynamic:2",
            ]
        )
        == 0
    )
    out = capsys.readouterr()
    lines = out.out.strip().split("\n")
    assert len(lines) == 2 and lines[0].startswith("the cat") and lines[1].startswith("the dog saw many")
    assert "for 2 prompts" in out.err


def test_flags_are_kebab_case_and_the_old_snake_case_spellings_still_work():
    kebab = parse_args(["--model-path", "m", "--max-new-tokens", "3", "--top-p", "0.5", "--no-stream"])
    snake = parse_args(["--model_path", "m", "--max_new_tokens", "3", "--top_p", "0.5", "--no_stream"])
    assert vars(kebab) == vars(snake)
    assert (kebab.model_path, kebab.max_new_tokens, kebab.top_p, kebab.no_stream) == ("m", 3, 0.5, True)
    converted = convert_parse_args(["reshard", "a", "b", "--world-size", "2", "--expert_parallel_size", "2"])
    assert (converted.world_size, converted.expert_parallel_size) == (2, 2)
