"""The evaluation math, one function for the trainer's periodic evaluation and for ``mymoe-evaluate``: the
lm loss summed over the scored tokens of some batches, in eval mode, under the run's autocast. Both commands
report its token-weighted mean and exp of it, so they agree on the same batches of the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Optional

import torch

from mymoe.config import Config
from mymoe.model.transformer import IGNORE_INDEX
from mymoe.train.precision import autocast_context


@dataclass
class LossSum:
    nats: float = 0.0  # sum over scored tokens of their cross-entropy
    tokens: int = 0  # tokens scored (labels other than -100)
    batches: int = 0

    @property
    def loss(self) -> float:
        return self.nats / max(self.tokens, 1)

    def add(self, other: LossSum) -> None:
        self.nats += other.nats
        self.tokens += other.tokens
        self.batches += other.batches


def perplexity(loss: float) -> float:
    """exp(mean loss); inf where that overflows a float."""
    return math.exp(loss) if loss < 700 else math.inf


@torch.no_grad()
def sum_lm_loss(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    config: Config,
    device: torch.device,
    stop_requested: Optional[Callable[[], bool]] = None,
    after_batch: Optional[Callable[[LossSum], None]] = None,
) -> Optional[LossSum]:
    """The lm loss of `model` over (input_ids, labels) batches, in eval mode (capacity at
    eval_capacity_factor, no router noise); None when `stop_requested()` turns true between batches.
    The model's training mode is restored afterwards."""
    was_training = model.training
    model.eval()
    total = LossSum()
    try:
        for input_ids, labels in batches:
            if stop_requested is not None and stop_requested():
                return None
            with autocast_context(config, device):
                out = model(input_ids.to(device), shift_labels=labels.to(device))
            tokens = int((labels != IGNORE_INDEX).sum())
            total.add(LossSum(float(out.lm_loss) * tokens, tokens, 1))  # lm_loss is the mean over those tokens
            if after_batch is not None:
                after_batch(total)
    finally:
        model.train(was_training)
    return total
