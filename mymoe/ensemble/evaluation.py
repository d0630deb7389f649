"""Held-out scores of an ensemble: each member's loss alone and the ensemble's, per dataset and overall
(token-weighted), and how the gate routed: to which member, how often to the member that fits the sample
best, and, given the member each dataset belongs to (`labels`), the routing accuracy.

Each prefix is read once in file order (mymoe.data.reader.FileOrderBatches), as mymoe-evaluate reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from mymoe.data.reader import FileOrderBatches
from mymoe.ensemble.folder import load_ensemble, read_manifest
from mymoe.evaluate.run import check_positions, check_prefix
from mymoe.model.transformer import IGNORE_INDEX
from mymoe.train.evaluation import perplexity


@torch.no_grad()
def evaluate_ensemble(
    folder: str | Path,
    prefixes: list[str],
    labels: Optional[list[int]] = None,
    seq_len: Optional[int] = None,
    batch_size: int = 8,
    max_batches: Optional[int] = None,
    gate_tokens: Optional[int] = None,
    device: Optional[str] = None,
    progress: bool = True,
    announce: Callable[[str], None] = print,
) -> dict:
    """{"ensemble", "members", "seq_len", "datasets": [one result per prefix], "overall"}; a result holds
    "tokens", "samples", "member_loss" [per member], "ensemble_loss", "ensemble_perplexity", "routed"
    [samples whose top member is each member], "best_member_agreement" and, with labels, "label" and
    "routing_accuracy". gate_tokens: the gate routes each sample from its first this many tokens only, as it
    routes a prompt in generation (default: the whole sample)."""
    if labels is not None and len(labels) != len(prefixes):
        raise ValueError(f"--labels has {len(labels)} entries for {len(prefixes)} --data prefixes: give one per prefix")
    manifest = read_manifest(Path(folder))  # the inputs are checked before any member is loaded
    count = len(manifest["members"])
    if labels is not None and any(not 0 <= label < count for label in labels):
        raise ValueError(f"--labels {labels}: each is a member index, 0..{count - 1}")
    seq_len = seq_len or manifest["seq_len"]
    for prefix in prefixes:
        check_prefix(prefix, seq_len, manifest["vocab_size"])
    ensemble, _ = load_ensemble(folder)
    for member in ensemble.members:
        check_positions(member.config, seq_len)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ensemble.to(device).eval()
    announce(
        f"evaluating {folder} ({count} members, threshold {ensemble.threshold}) on {len(prefixes)} dataset(s): "
        f"seq_len {seq_len}, batch {batch_size}, gate reads {f'{gate_tokens} tokens' if gate_tokens else 'all'}, {f'at most {max_batches} batches each' if max_batches else 'every sample once'}"
    )
    results, overall = [], Tally(count, labelled=labels is not None)
    for index, prefix in enumerate(prefixes):
        batches = FileOrderBatches(prefix, seq_len, batch_size)
        total = min(len(batches), max_batches or len(batches))
        tally = Tally(count, labels[index] if labels is not None else None)
        for step, (input_ids, batch_labels) in enumerate(
            tqdm(batches, total=total, desc=prefix, unit="batch", leave=False, disable=not progress)
        ):
            if step == total:
                break
            tally.add(ensemble, input_ids.to(device), batch_labels.to(device), gate_tokens)
        overall.merge(tally)
        result = {"data": prefix, **tally.summary()}
        results.append(result)
        announce(describe(result))
    return {
        "ensemble": str(folder),
        "members": manifest["members"],
        "seq_len": seq_len,
        "datasets": results,
        "overall": overall.summary(),
    }


class Tally:
    """Sums over samples: nats of each member and of the ensemble, where the gate sent them, and (with the
    member the samples belong to, `label`) how many it sent there."""

    def __init__(self, members: int, label: Optional[int] = None, labelled: bool = False):
        self.label, self.labelled = label, labelled or label is not None
        self.tokens = self.samples = self.agreed = self.correct = 0
        self.member_nats = [0.0] * members
        self.ensemble_nats = 0.0
        self.routed = [0] * members

    def add(self, ensemble, input_ids: torch.Tensor, labels: torch.Tensor, gate_tokens: Optional[int]) -> None:
        tokens = (labels != IGNORE_INDEX).sum(1).float()  # [B]
        member_losses = ensemble.member_losses(input_ids, labels)  # [B, M] means over each sample's tokens
        output = ensemble(input_ids, labels, gate_tokens=gate_tokens)
        chosen = output.weights.argmax(1)  # [B] the top member of each sample
        self.tokens += int(tokens.sum())
        self.samples += len(input_ids)
        self.member_nats = [a + float(b) for a, b in zip(self.member_nats, (member_losses * tokens[:, None]).sum(0))]
        self.ensemble_nats += float(output.lm_loss) * float(tokens.sum())
        self.routed = [a + int(b) for a, b in zip(self.routed, torch.bincount(chosen, minlength=len(self.routed)))]
        self.agreed += int((chosen == member_losses.argmin(1)).sum())
        if self.label is not None:
            self.correct += int((chosen == self.label).sum())

    def merge(self, other: Tally) -> None:
        self.tokens += other.tokens
        self.samples += other.samples
        self.agreed += other.agreed
        self.correct += other.correct
        self.member_nats = [a + b for a, b in zip(self.member_nats, other.member_nats)]
        self.ensemble_nats += other.ensemble_nats
        self.routed = [a + b for a, b in zip(self.routed, other.routed)]

    def summary(self) -> dict:
        tokens, samples = max(self.tokens, 1), max(self.samples, 1)
        result = {
            "tokens": self.tokens,
            "samples": self.samples,
            "member_loss": [nats / tokens for nats in self.member_nats],
            "ensemble_loss": self.ensemble_nats / tokens,
            "ensemble_perplexity": perplexity(self.ensemble_nats / tokens),
            "routed": self.routed,
            "best_member_agreement": self.agreed / samples,
        }
        if self.label is not None:
            result["label"] = self.label
        if self.labelled:
            result["routing_accuracy"] = self.correct / samples
        return result


def describe(result: dict) -> str:
    members = ", ".join(f"member {i} {loss:.4f}" for i, loss in enumerate(result["member_loss"]))
    accuracy = f", routing accuracy {result['routing_accuracy']:.3f}" if "routing_accuracy" in result else ""
    return (
        f"{result['data']}: ensemble loss {result['ensemble_loss']:.4f} ({members}) over {result['tokens']:,} "
        f"tokens; routed {result['routed']}, to the best-fitting member {result['best_member_agreement']:.3f}"
        f"{accuracy}"
    )
