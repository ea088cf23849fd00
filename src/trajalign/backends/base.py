"""What every generation backend takes and returns: contexts as token ids, continuations as token ids."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; temperature 0 means greedy. `seed` makes a sampled continuation reproducible alone."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class GenerationRequest:
    """Continue `trunk[:branch] + suffix`. Requests sharing a trunk share one prefill of it."""

    key: str
    trunk: list[int]
    branch: int
    suffix: list[int] = field(default_factory=list)
    sampling: Sampling = Sampling()
    max_new_tokens: int = 64

    @property
    def context(self) -> list[int]:
        return self.trunk[: self.branch] + self.suffix


@dataclass
class GenerationResult:
    key: str
    continuation_ids: list[int]
    finish_reason: str
    top2_gaps: list[float] = field(default_factory=list)
    seconds: float = 0.0
    exact_ids: bool = True  # the context went in and the continuation came back as token ids, not as text


class Backend(Protocol):
    name: str
    needs_weights: bool  # a local backend runs the weights; a server needs only the tokenizer and chat format
    identity: str  # what produced the tokens (backend, server, served model), for caches of generated answers

    def generate(self, requests: list[GenerationRequest]) -> Iterator[list[GenerationResult]]:
        """Yield results a batch at a time, so callers can persist progress as it is made."""
        ...
