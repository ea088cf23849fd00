"""Insertion: the model writes `after` tokens of its own answer, a span is spliced in, and the model continues."""

from __future__ import annotations

import hashlib
import random
from typing import Literal

from pydantic import Field, field_validator

from trajalign.attacks.base import BaseAttack, BasePosition, PlannedEpisode, PlanningContext, sorted_counts
from trajalign.data.datasets import Behavior
from trajalign.data.trajectories import Trajectory


class InsertPosition(BasePosition):
    kind: Literal["insert"] = "insert"
    after: int
    length: int | None = Field(description="trajectory tokens inserted; None when a given text is")

    @property
    def label(self) -> str:
        return f"after={self.after},text" if self.length is None else f"after={self.after},len={self.length}"


class Insert(BaseAttack):
    """The model writes `after` of its own tokens; a span is inserted; the model continues."""

    kind: Literal["insert"] = "insert"
    after: list[int] = Field(default=[8], description="own-answer tokens before the insertion")
    random_after: tuple[int, int] | None = Field(
        default=None, description="draw one insertion point per behavior uniformly from [low, high] instead")
    seed: int = Field(default=0, description="seed for random insertion points")
    span_lengths: list[int] = Field(default=[10], description="inserted trajectory tokens (L)")
    span_text: str | None = Field(default=None, description="insert this text instead of trajectory tokens")
    position_type = InsertPosition

    @field_validator("after", "span_lengths")
    @classmethod
    def _positive_list(cls, values: list[int]) -> list[int]:
        return sorted_counts(values)

    def points_for(self, behavior_id: str) -> list[int]:
        if self.random_after is None:
            return self.after
        low, high = self.random_after
        digest = hashlib.sha256(f"{self.seed}:{behavior_id}".encode()).hexdigest()
        return [random.Random(int(digest[:16], 16)).randint(low, high)]

    def grid(self, behavior: Behavior) -> list[InsertPosition]:
        lengths = [None] if self.span_text is not None else self.span_lengths
        return [InsertPosition(after=after, length=length) for after in self.points_for(behavior.id)
                for length in lengths]

    def tokens_needed(self, position: InsertPosition) -> int:
        return position.length or 0

    def plan(self, items: list[tuple[Behavior, Trajectory]], context: PlanningContext) -> list[PlannedEpisode]:
        longest = max(max(self.points_for(behavior.id)) for behavior, _ in items)
        prompts = {behavior.id: context.chat.prompt_ids(behavior.prompt) for behavior, _ in items}
        own = context.continue_greedily(prompts, max(longest, 1))
        text_span = context.chat.encode_span(self.span_text) if self.span_text is not None else None
        planned = []
        for behavior, trajectory in items:
            prompt = prompts[behavior.id]
            for position in self.positions(behavior, trajectory):
                span = text_span if position.length is None else trajectory.token_ids[:position.length]
                trunk = prompt + own[behavior.id][:position.after]
                planned.append(context.episode(
                    behavior, position, trunk=trunk, branch=len(trunk), suffix=span + context.defense_ids,
                    depth=len(trunk) - len(prompt) + len(span), answer_start=len(prompt),
                    injected_spans=[(len(trunk), len(trunk) + len(span))],
                ))
        return planned
