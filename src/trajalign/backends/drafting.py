"""Drafts for greedy rows: tokens guessed ahead and fed in the same forward pass, kept where the model confirms.

A drafter proposes; the engine verifies (a draft token is kept only where it is the model's own greedy choice),
so a drafter changes how many forward passes a run takes, never what it generates. To add one, implement
`Drafter` (`propose` and `calibrate`) and pass it to `HFBackend(drafter=...)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Protocol


@dataclass
class DraftRecord:
    """Draft tokens the model confirmed, and drafts it broke off before their end."""

    confirmed: int = 0
    broken: int = 0

    def add(self, draft_length: int, taken: int) -> None:
        self.confirmed += taken
        self.broken += taken < draft_length

    def acceptance(self, prior: float = 0.5, weight: float = 2.0) -> float:
        """Estimated chance that the next draft token is confirmed: run lengths, shrunk towards `prior`."""
        return (self.confirmed + prior * weight) / (self.confirmed + self.broken + weight)


@dataclass
class DraftSlot:
    """What a drafter sees of one row in a decoding step."""

    sequence: list[int]  # the row's context and continuation so far
    pool: list[list[int]]  # its trunk and the sequences of the trunk's branches, to copy drafts from
    room: int  # the most draft tokens the row can use (0 for a sampled row or its last token)
    forced: int  # tokens the row feeds in this step whatever the draft
    record: DraftRecord  # how the row's drafts fared so far


class Drafter(Protocol):
    def propose(self, slots: list[DraftSlot], run_record: DraftRecord) -> list[list[int]]:
        """One draft per slot (possibly empty); `run_record` is how drafts fared across the run."""
        ...

    def calibrate(self, relative_step_cost: Callable[[int], float]) -> None:
        """Called once a run's batch is in place: `relative_step_cost(extra)` times a step feeding 1 + extra
        tokens per row against a one-token step, on that batch."""
        ...


class NoDrafter:
    """Feeds no drafts: one new token per row per forward pass."""

    def propose(self, slots: list[DraftSlot], run_record: DraftRecord) -> list[list[int]]:
        return [[] for _ in slots]

    def calibrate(self, relative_step_cost: Callable[[int], float]) -> None:
        pass


class LookupDrafter:
    """Drafts copied from the row's trunk or a sibling branch (`lookup_draft`), cut to the length that pays.

    Feeding a longer draft costs every row of the batch a wider step. The cost model: a step feeding `extra`
    positions beyond one per row costs 1 + draft_cost * (extra + 0.5) one-token steps (the first extra position
    costs half as much again; `benchmarks/draft_cost.py` measures the curve). All drafts of a step are cut to the
    length that maximises expected tokens per unit of cost, each row's chance of confirming a token estimated from
    its record (a row without one starts from what drafts have earned across the run). `draft_cost=None` measures
    it on the run's first batch.
    """

    def __init__(self, max_tokens: int = 8, draft_cost: float | None = None):
        self.max_tokens = max_tokens
        self.draft_cost = draft_cost

    def calibrate(self, relative_step_cost: Callable[[int], float]) -> None:
        if self.draft_cost is None:
            self.draft_cost = fitted_draft_cost(relative_step_cost(self.max_tokens), self.max_tokens)

    def propose(self, slots: list[DraftSlot], run_record: DraftRecord) -> list[list[int]]:
        candidates = [lookup_draft(slot.sequence, slot.pool, min(self.max_tokens, slot.room)) if slot.room > 0 else []
                      for slot in slots]
        if not any(candidates):
            return candidates
        prior = run_record.acceptance()
        rates = [slot.record.acceptance(prior) for slot in slots]
        forced = [slot.forced for slot in slots]
        best = max(range(max(map(len, candidates)) + 1),
                   key=lambda length: tokens_per_cost(length, candidates, rates, forced, self.draft_cost or 0.0))
        return [draft[:best] for draft in candidates]


def tokens_per_cost(length: int, drafts: list[list[int]], rates: list[float], forced: list[int],
                    draft_cost: float) -> float:
    """Expected new tokens per unit of step cost when every draft is cut to `length`."""
    expected = sum(1 + sum(rate ** i for i in range(1, min(length, len(draft)) + 1))
                   for rate, draft in zip(rates, drafts))
    extra = max(fed + min(length, len(draft)) for fed, draft in zip(forced, drafts)) - 1
    return expected / (1 + draft_cost * (extra + 0.5 * (extra > 0)))


def fitted_draft_cost(relative_cost: float, extra: int) -> float:
    """The cost model's draft_cost from one measured step: 1 + draft_cost * (extra + 0.5) = relative_cost."""
    return max(0.0, (relative_cost - 1) / (extra + 0.5))


def accepted_length(draft: list[int], choices: list[int]) -> int:
    """How many draft tokens the model confirms: the draft's i-th token must be its choice after the (i-1)-th."""
    for offset, token in enumerate(draft):
        if choices[offset] != token:
            return offset
    return len(draft)


def lookup_draft(sequence: list[int], pool: list[list[int]], budget: int, ngram_sizes=(3, 2),
                 context_window: int = 16) -> list[int]:
    """Up to `budget` tokens that followed the last n-gram of `sequence` somewhere in `pool`.

    Prompt-lookup drafting (Saxena 2023) across a trunk's branches: a branch finds its own trunk ahead of it, and
    siblings converge on the same refusal or the same compliance. Of several matches, the longest draft wins, then
    the one whose preceding tokens agree longest with `sequence` (the branch's own place in its trunk).
    """
    best: list[int] = []
    best_agreement = -1
    for size in ngram_sizes:
        if len(sequence) < size:
            continue
        pattern = sequence[-size:]
        for candidate in pool:
            for start in _occurrences(candidate, pattern):
                found = candidate[start + size:start + size + budget]
                if len(found) < len(best):
                    continue
                agreement = _agreement_before(sequence, len(sequence) - size, candidate, start, context_window)
                if len(found) > len(best) or agreement > best_agreement:
                    best, best_agreement = found, agreement
        if best:
            break
    return best


def _occurrences(candidate: list[int], pattern: list[int]) -> Iterator[int]:
    """Starts of `pattern` in `candidate` that something follows; list.index scans in C."""
    first, size, last_start = pattern[0], len(pattern), len(candidate) - len(pattern) - 1
    start = 0
    while start <= last_start:
        try:
            start = candidate.index(first, start, last_start + 1)
        except ValueError:
            return
        if candidate[start:start + size] == pattern:
            yield start
        start += 1


def _agreement_before(sequence: list[int], end: int, candidate: list[int], candidate_end: int, limit: int) -> int:
    """How many tokens before `end` in `sequence` equal those before `candidate_end` in `candidate`."""
    length = 0
    while (length < limit and length < end and length < candidate_end
           and sequence[end - 1 - length] == candidate[candidate_end - 1 - length]):
        length += 1
    return length
