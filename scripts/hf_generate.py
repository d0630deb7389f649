"""Load an export-hf folder with transformers alone and generate greedily from it.

    python scripts/hf_generate.py out/hf --prompt "def " --max-new-tokens 40 [--reference runs/NAME/checkpoints]

With --reference, the same greedy continuation is computed by mymoe from the checkpoint that was exported,
and the script exits 1 unless transformers produced the same token ids: the proof that the export is the
model that was trained, read by code that has never seen mymoe.
"""

import argparse
import sys
from pathlib import Path

import sentencepiece as spm
import torch


def greedy_with_transformers(folder: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    input_ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    print(
        f"transformers loaded {type(model).__name__} from {folder} "
        f"({sum(p.numel() for p in model.parameters()):,} parameters)"
    )
    return out[0, len(prompt_ids) :].tolist()


def greedy_with_mymoe(checkpoint: str, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    from mymoe.load import load_model

    model = load_model(checkpoint)[0]
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, temperature=0.0)
    return out[0, len(prompt_ids) :].tolist()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a folder written by mymoe-convert export-hf")
    parser.add_argument("--prompt", default="def ")
    parser.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=40)
    parser.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: FOLDER/tokenizer.model)")
    parser.add_argument("--reference", default=None, help="the mymoe checkpoint that was exported, to compare")
    args = parser.parse_args(argv)
    tokenizer_file = args.tokenizer or args.folder / "tokenizer.model"
    if not Path(tokenizer_file).is_file():
        print(f"error: no tokenizer at {tokenizer_file}: export with --tokenizer or pass --tokenizer", file=sys.stderr)
        return 1
    tokenizer = spm.SentencePieceProcessor(model_file=str(tokenizer_file))
    # As mymoe.generate does: training documents end with </s>, so a prompt starts a new document after one.
    prompt_ids = ([tokenizer.eos_id()] if tokenizer.eos_id() >= 0 else []) + tokenizer.encode(args.prompt)
    ids = greedy_with_transformers(args.folder, prompt_ids, args.max_new_tokens)
    print(f"transformers, greedy: {args.prompt}{tokenizer.decode(ids)!r}")
    if args.reference is None:
        return 0
    reference = greedy_with_mymoe(args.reference, prompt_ids, args.max_new_tokens)
    same = sum(a == b for a, b in zip(ids, reference))
    if ids != reference:
        print(f"error: transformers and mymoe agree on only {same} of {len(ids)} greedy tokens", file=sys.stderr)
        return 1
    print(f"transformers and mymoe ({args.reference}) produce the same {len(ids)} greedy tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
