"""Training objectives beyond plain cross-entropy: Qi et al.'s token-wise constrained loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field


class ConstrainedSettings(BaseModel):
    """Per-token beta schedule of Qi et al. (ICLR 2025): strong constraint early in the answer, weak later."""

    model_config = ConfigDict(extra="forbid")
    beta_first: float = Field(default=0.5, gt=0, description="beta on the first trained token")
    beta_early: float = Field(default=2.0, gt=0, description="beta on trained tokens 2..5")
    beta_late: float = Field(default=0.1, gt=0, description="beta from the 6th trained token on")

    def betas(self, token_index: torch.Tensor) -> torch.Tensor:
        """token_index counts trained tokens from 1 within each row."""
        betas = torch.full_like(token_index, self.beta_late, dtype=torch.float32)
        betas = torch.where(token_index <= 5, torch.tensor(self.beta_early), betas)
        return torch.where(token_index == 1, torch.tensor(self.beta_first), betas)


def trained_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence positions whose next-token prediction is trained (in any row), and their targets.

    Position t predicts labels[t + 1]; asking the model for logits at these positions only skips the LM head
    over prompts and injected spans, which on a small model is a large share of the compute.
    """
    shifted = labels[:, 1:]
    positions = (shifted != -100).any(dim=0).nonzero().squeeze(-1)
    return positions, shifted[:, positions]


def label_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of `targets` (-100 = untrained) under `logits` at the same positions, and the mask."""
    mask = targets != -100
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    chosen = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return chosen * mask, mask


def constrained_loss(policy_log_probs: torch.Tensor, reference_log_probs: torch.Tensor, mask: torch.Tensor,
                     settings: ConstrainedSettings, count: torch.Tensor | None = None) -> torch.Tensor:
    """mean over trained tokens of -(2 / beta_t) * log sigmoid(beta_t * (log pi - log pi_ref)).

    As beta -> 0 its gradient tends to the cross-entropy gradient; large beta keeps a token near the reference.
    `count` divides the sum instead of this batch's trained tokens: those of a whole accumulated step.
    """
    token_index = mask.long().cumsum(dim=1)
    betas = settings.betas(token_index).to(policy_log_probs.device)
    per_token = -(2.0 / betas) * F.logsigmoid(betas * (policy_log_probs - reference_log_probs))
    return (per_token * mask).sum() / (mask.sum() if count is None else count).clamp(min=1)
