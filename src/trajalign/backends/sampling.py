"""Sampling a next token: temperature, then top-k, then top-p (nucleus) filtering, then one seeded draw."""

from __future__ import annotations

import torch

from trajalign.backends.base import Sampling


def filtered_distribution(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The distribution a token is drawn from: softmax of logits / temperature over the top-k tokens, cut to the
    smallest set of most likely tokens whose mass reaches top_p (the token that crosses it included)."""
    scores = logits / sampling.temperature
    if sampling.top_k > 0:
        kth = scores.topk(min(sampling.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_scores, order = scores.sort(descending=True)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        remove = cumulative - sorted_scores.softmax(-1) >= sampling.top_p
        scores = scores.masked_fill(torch.zeros_like(remove).scatter(0, order, remove), float("-inf"))
    return scores.softmax(-1)


def sample_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """One draw from `filtered_distribution`, from `generator` (so a row's draws do not depend on its batch)."""
    return int(torch.multinomial(filtered_distribution(logits, sampling), 1, generator=generator))
