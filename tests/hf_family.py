"""What every tests/test_hf_<family>.py checks against transformers, for one tiny random model of the family:
import gives its logits and greedy tokens, the export loads back with ours, and 5 AdamW steps of both
models on the same batches give the same losses and final logits (fp32)."""

from __future__ import annotations

import os

import torch

from mymoe.convert.consolidate import load_consolidated_model
from mymoe.convert.hf import export_hf, import_hf

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 64
BATCH = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))
LOGITS_TOLERANCE = 1e-4
LOSS_TOLERANCE = 1e-5


@torch.no_grad()
def draw_away_from_defaults(model, seed: int = 3) -> None:
    """Norms in [0.5, 1.5] and biases ~N(0, 0.1) instead of their ones and zeros, so a norm or bias that is
    dropped, swapped or misplaced changes the logits."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name and name.endswith("weight"):
            param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
        elif name.endswith("bias"):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def logits_of(model, ids=BATCH) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def import_into_ours(reference, tmp_path):
    """save_pretrained + import_hf + load: our model of the transformers model (eval mode)."""
    reference.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ours.safetensors")
    model, _ = load_consolidated_model(tmp_path / "ours.safetensors")
    return model.eval()


def export_to_transformers(model, tmp_path, name: str = "auto", architecture: str | None = None):
    from transformers import AutoModelForCausalLM

    done = export_hf(model, tmp_path / "export", name)
    if architecture is not None:
        assert done["architecture"] == architecture
    return AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()


def assert_same_logits_and_greedy_tokens(ours, theirs, new_tokens: int = 6) -> float:
    difference = max_difference(logits_of(ours), logits_of(theirs))
    assert difference < LOGITS_TOLERANCE, difference
    prompt = BATCH[:, :5]
    ours_tokens = ours.generate(prompt, max_new_tokens=new_tokens, temperature=0)
    theirs_tokens = theirs.generate(
        prompt,
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        attention_mask=torch.ones_like(prompt),
    )
    assert torch.equal(ours_tokens, theirs_tokens), (ours_tokens, theirs_tokens)
    return difference


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def train_both(ours, theirs, steps: int = 5, lr: float = 3e-3) -> tuple[float, float]:
    """`steps` AdamW steps of each model on the same batches (next-token loss, no aux loss);
    returns (largest loss difference, largest final logits difference)."""
    generator = torch.Generator().manual_seed(11)
    optimizers = [torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1) for model in (ours, theirs)]
    loss_difference = 0.0
    for model in (ours, theirs):
        model.train()
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (2, 12), generator=generator)
        losses = []
        for model, optimizer in zip((ours, theirs), optimizers):
            optimizer.zero_grad()
            loss = next_token_loss(model(ids).logits, ids)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        loss_difference = max(loss_difference, abs(losses[0] - losses[1]))
    ours.eval(), theirs.eval()
    logits_difference = max_difference(logits_of(ours), logits_of(theirs))
    assert loss_difference < LOSS_TOLERANCE, loss_difference
    assert logits_difference < LOGITS_TOLERANCE, logits_difference
    return loss_difference, logits_difference


def check_family(reference, tmp_path, name: str, architecture: str) -> dict:
    """The whole round: import, export back, train both; the measured differences (printed with -s)."""
    ours = import_into_ours(reference, tmp_path)
    imported = assert_same_logits_and_greedy_tokens(ours, reference)
    exported_model = export_to_transformers(ours, tmp_path, name, architecture)
    exported = assert_same_logits_and_greedy_tokens(ours, exported_model)
    loss_difference, trained = train_both(ours, reference)
    result = {
        "import_logits": imported,
        "export_logits": exported,
        "train_loss": loss_difference,
        "trained_logits": trained,
    }
    print(f"{architecture}: {result}")
    return result
