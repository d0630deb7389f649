"""Training dynamics of the MoE layer driven by the global step, and the learned token importance.

The trainer hands the step to ``MoECausalLM.forward(step=...)``, which keeps it as a plain Python int on
every MoE layer (``MoELayer.step``): each schedule below is host arithmetic on that int, so none of them
makes a step wait on the device. ``step=None`` (a model never given one, as at inference) means every
schedule is over: full MoE path, max capacity, full aux loss.

- warm-up (``moe_warmup_steps``): the layer output is (1 - a) * dense + a * moe, a = step / warmup rising
  from 0 to 1; the dense path is the shared expert when the layer has one (then the output is
  shared + a * routed), else a dense SwiGLU ``dense_ffn`` as wide as the k routed experts a token uses;
  after the warm-up the dense path is not computed (unless ``flexible_ffn`` keeps it).
- capacity growth: slots per expert go linearly from ``min_expert_capacity`` to ``max_expert_capacity``
  tokens over ``capacity_growth_steps`` (capacity mode only; they replace capacity_factor's count).
- aux-loss ramp: the layer's aux loss (every coefficient) times min(1, step / ``aux_loss_ramp_steps``).
- router reset: at every step that is a multiple of ``router_reset_interval`` the trainer re-initialises
  the routers (``MoECausalLM.reset_routers``) and clears their optimizer state.
- flexible FFN: the same mix with a learned g = sigmoid(``ffn_mix_logit``) in place of a (times a during
  a warm-up), trained with the rest of the model.
- token importance: ``TokenImportance`` below.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mymoe.config import MoEConfig


def schedule_fraction(step: Optional[int], steps: int) -> float:
    """min(1, step / steps): how far a schedule of `steps` steps has come; 1 when off or step unknown."""
    if steps <= 0 or step is None:
        return 1.0
    return min(1.0, step / steps)


def scheduled_capacity(step: Optional[int], moe: MoEConfig) -> int:
    """Slots per expert at this step: min_expert_capacity growing linearly to max_expert_capacity."""
    low, high = moe.min_expert_capacity, moe.max_expert_capacity
    return low + round((high - low) * schedule_fraction(step, moe.capacity_growth_steps))


def router_reset_due(step: int, interval: int) -> bool:
    """Whether the routers are re-initialised before this step (never before the first)."""
    return interval > 0 and step > 0 and step % interval == 0


class TokenImportance(nn.Module):
    """A learned score per token, s = w . x. At capacity an expert keeps its assignments in order of s
    (highest first; a token's k choices share it, its first choice ahead) instead of router weight.

    The order itself has no gradient, so s also scales the token's routed output by 2 * sigmoid(s)
    (1 at s = 0, where a small init starts): a token whose expert output lowers the loss gets its score
    raised, and with it its claim on a slot the next time its expert overflows.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.score = nn.Linear(hidden_size, 1, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [tokens, hidden] -> scores [tokens], in fp32 like the routing decisions."""
        return self.score(tokens).squeeze(-1).float()

    @staticmethod
    def output_scale(scores: torch.Tensor) -> torch.Tensor:
        return 2 * torch.sigmoid(scores)
