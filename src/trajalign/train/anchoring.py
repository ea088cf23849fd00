"""Benign likelihood anchoring: a KL term that keeps the model's next-token distributions on benign rows where
the frozen original model had them, so training moves the model where it must and nowhere else."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from trajalign.train.recipes import IGNORE


def benign_kl(policy_logits: torch.Tensor, reference_logits: torch.Tensor, targets: torch.Tensor,
              benign_rows: torch.Tensor) -> torch.Tensor:
    """Mean over the trained tokens of benign rows of KL(p_reference || p_policy), over the whole vocabulary.

    Logits are [rows, positions, vocab] at the positions whose next token is trained; `targets` marks those
    tokens (IGNORE elsewhere) and `benign_rows` [rows] says which rows are benign. Zero when no row is.
    """
    mask = (targets != IGNORE) & benign_rows.to(targets.device).bool().unsqueeze(1)
    reference = torch.log_softmax(reference_logits.float(), dim=-1)
    policy = torch.log_softmax(policy_logits.float(), dim=-1)
    per_token = (reference.exp() * (reference - policy)).sum(dim=-1)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def reference_logits(model, reference_model, forward: dict) -> torch.Tensor:
    """Logits of the frozen original: a separate copy when there is one, else (LoRA) the model with its adapters
    disabled. No gradient reaches either."""
    if reference_model is not None:
        context, source = nullcontext(), reference_model
    else:
        context, source = model.disable_adapter(), model
    with torch.no_grad(), context:
        return source(**forward).logits


def anchoring_loss(model, reference_model, forward: dict, policy_logits: torch.Tensor, targets: torch.Tensor,
                   benign_rows: torch.Tensor) -> torch.Tensor:
    """`benign_kl` for one training batch; the original model runs on the benign rows only."""
    benign_rows = benign_rows.to(targets.device).bool()
    if not benign_rows.any():
        return policy_logits.new_zeros(())
    benign_forward = {**forward, "input_ids": forward["input_ids"][benign_rows],
                      "attention_mask": forward["attention_mask"][benign_rows]}
    reference = reference_logits(model, reference_model, benign_forward)
    return benign_kl(policy_logits[benign_rows], reference, targets[benign_rows], benign_rows[benign_rows])
