"""The two output heads' decoding rule (TinySeek's fc1 "main prediction" and fc2 "candidate prediction").

Both heads are linear maps of the same final hidden state to the vocabulary (``lm_head`` and, with
``model.candidate_head``, ``candidate_head``), and both are trained on the same next-token labels: loss =
main loss + candidate_loss_weight * candidate loss. What TinySeek's fc2 predicts is not known beyond
"candidate prediction"; we read it as a second opinion on the same token, which is what makes the
confidence rule below meaningful (a fallback for the same position, not a different target).
"""

from __future__ import annotations

import torch


def dual_head_choice(main_logits: torch.Tensor, candidate_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Greedy tokens [B] from both heads' logits [B, V] (repetition penalty already applied): the main head's
    argmax where its softmax probability is >= threshold, else the candidate head's argmax.

    threshold 0 is the main head's greedy output, a threshold above 1 the candidate head's.
    """
    main_probs = main_logits.float().softmax(dim=-1)
    confidence, main_token = main_probs.max(dim=-1)
    return torch.where(confidence >= threshold, main_token, candidate_logits.argmax(dim=-1))
