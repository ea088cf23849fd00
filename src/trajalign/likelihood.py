"""Log-likelihood of answer tokens given their contexts, batched and right-padded, with logits only where needed."""

from __future__ import annotations

from typing import Callable

import torch

from trajalign.batching import pad_right


def token_budget_batches(lengths: list[int], max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped longest first so that each batch's padded size (rows x longest) stays within the budget;
    a sequence longer than the budget goes alone. Sorting by length keeps padding small."""
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    batches: list[list[int]] = []
    for index in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_batch_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


# Padded tokens per likelihood pass: the lm-head's logits over the answer positions are the widest tensor of the pass
# (at 4096, a Dolly utility pass peaked 1.9 GB higher), and smaller passes waste less padding.
MAX_BATCH_TOKENS = 1024


@torch.inference_mode()
def answer_log_probs(handle, items: list[tuple[list[int], list[int]]], max_batch_tokens: int = MAX_BATCH_TOKENS,
                     progress: Callable[[int, int], None] | None = None) -> list[torch.Tensor]:
    """items: (context ids, answer ids). For each item, the float64 log-probability of every answer token given
    the context and the answer tokens before it, as one unbatched forward pass of context + answer gives it.

    Right padding keeps each real token's position id; `logits_to_keep` skips the lm-head (the widest tensor of
    the pass) over the context positions that no row of the batch needs.
    """
    for context, _ in items:
        if not context:
            raise ValueError("every answer needs a non-empty context (at least the chat prompt)")
    results: list[torch.Tensor] = [torch.zeros(0, dtype=torch.float64)] * len(items)
    lengths = [len(context) + len(answer) for context, answer in items]
    done = 0
    for batch in token_budget_batches(lengths, max_batch_tokens):
        done += len(batch)
        batch = [index for index in batch if items[index][1]]
        if not batch:
            continue
        input_ids, attention_mask = pad_right([items[i][0] + items[i][1] for i in batch],
                                               handle.tokenizer.pad_token_id, handle.device)
        width = input_ids.shape[1]
        first_needed = min(len(items[i][0]) - 1 for i in batch)  # the position that predicts an answer's 1st token
        logits = handle.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                              logits_to_keep=width - first_needed).logits
        for row, index in enumerate(batch):
            context, answer = items[index]
            start = len(context) - 1 - first_needed
            log_probs = logits[row, start:start + len(answer)].float().log_softmax(-1)
            targets = torch.tensor(answer, device=log_probs.device)[:, None]
            results[index] = log_probs.gather(-1, targets)[:, 0].double().cpu()
        if progress:
            progress(done, len(items))
    return results
