"""Batching and padding of token-id sequences, shared by generation, probing and training."""

from __future__ import annotations

from itertools import islice
from typing import Iterable, Iterator, TypeVar

Item = TypeVar("Item")


def batches(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    """Consecutive chunks of `size` items (the last may be shorter)."""
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def pad_right(sequences: list[list[int]], pad_value: int, device=None):
    """(ids, attention mask), both [len(sequences), longest]: each sequence from column 0, `pad_value` after it.

    Right padding keeps every real token's position id what it is in an unpadded pass.
    """
    import torch

    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
    if device is not None:
        return input_ids.to(device), attention_mask.to(device)
    return input_ids, attention_mask
