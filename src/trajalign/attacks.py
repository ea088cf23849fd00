"""Declarative, serializable attack plans: where harmful tokens enter the assistant turn, and how."""

from __future__ import annotations

import hashlib
import random
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Prefill(_Strict):
    """The answer starts with the first `depth` trajectory tokens; the model continues."""

    kind: Literal["prefill"] = "prefill"
    depths: list[int] = Field(default=[0, 5, 10, 20, 40], description="prefix lengths in target-model tokens")

    @field_validator("depths")
    @classmethod
    def _non_negative(cls, depths: list[int]) -> list[int]:
        if not depths or any(depth < 0 for depth in depths):
            raise ValueError("depths must be a non-empty list of numbers >= 0")
        return sorted(set(depths))


class Insert(_Strict):
    """The model writes `after` of its own tokens; a span is inserted; the model continues."""

    kind: Literal["insert"] = "insert"
    after: list[int] = Field(default=[8], description="own-answer tokens before the insertion")
    random_after: tuple[int, int] | None = Field(
        default=None, description="draw one insertion point per behavior uniformly from [low, high] instead")
    seed: int = Field(default=0, description="seed for random insertion points")
    span_lengths: list[int] = Field(default=[10], description="inserted trajectory tokens (L)")
    span_text: str | None = Field(default=None, description="insert this text instead of trajectory tokens")

    @field_validator("after", "span_lengths")
    @classmethod
    def _positive_list(cls, values: list[int]) -> list[int]:
        if not values or any(value < 0 for value in values):
            raise ValueError("must be a non-empty list of numbers >= 0")
        return sorted(set(values))

    def points_for(self, behavior_id: str) -> list[int]:
        if self.random_after is None:
            return self.after
        low, high = self.random_after
        digest = hashlib.sha256(f"{self.seed}:{behavior_id}".encode()).hexdigest()
        return [random.Random(int(digest[:16], 16)).randint(low, high)]

    def lengths(self) -> list[int]:
        return [0] if self.span_text is not None else self.span_lengths


class MultiInsert(_Strict):
    """Several insertions into one answer: after each point the next trajectory span goes in."""

    kind: Literal["multi-insert"] = "multi-insert"
    after: list[int] = Field(default=[8, 24], description="own tokens generated before each insertion")
    span_length: int = Field(default=10, gt=0, description="trajectory tokens per insertion")


class Decoding(_Strict):
    """Generation exploitation: a seeded sweep over sampling settings, n samples each."""

    kind: Literal["decoding"] = "decoding"
    temperatures: list[float] = Field(default=[0.7, 1.0, 1.5])
    top_ps: list[float] = Field(default=[0.9, 1.0])
    top_ks: list[int] = Field(default=[0, 40], description="0 turns top-k off")
    samples: int = Field(default=2, gt=0)
    seed: int = 0

    def settings(self) -> list[tuple[float, float, int]]:
        return [(t, p, k) for t in self.temperatures for p in self.top_ps for k in self.top_ks]


Attack = Annotated[Union[Prefill, Insert, MultiInsert, Decoding], Field(discriminator="kind")]
ATTACK_KINDS = ("prefill", "insert", "multi-insert", "decoding")


class ReinjectHeader(_Strict):
    """Defense (Any-Depth Alignment style): after the injection, the assistant header tokens are re-inserted
    so the model reassesses its answer as if starting a fresh turn."""

    kind: Literal["reinject-header"] = "reinject-header"


def default_attack(kind: str) -> Attack:
    return {"prefill": Prefill, "insert": Insert, "multi-insert": MultiInsert, "decoding": Decoding}[kind]()
