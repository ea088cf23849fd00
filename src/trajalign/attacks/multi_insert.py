"""Several insertions into one answer: the model writes up to each point, the next trajectory chunk goes in."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from trajalign.attacks.base import BaseAttack, BasePosition, PlannedEpisode, PlanningContext
from trajalign.data.datasets import Behavior
from trajalign.data.trajectories import Trajectory


class MultiInsertPosition(BasePosition):
    kind: Literal["multi-insert"] = "multi-insert"
    after: tuple[int, ...]
    length: int

    @property
    def label(self) -> str:
        return "after=" + "+".join(map(str, self.after)) + f",len={self.length}"


class MultiInsert(BaseAttack):
    """Several insertions into one answer: after each point the next trajectory span goes in."""

    kind: Literal["multi-insert"] = "multi-insert"
    after: list[int] = Field(default=[8, 24], description="own tokens generated before each insertion")
    span_length: int = Field(default=10, gt=0, description="trajectory tokens per insertion")
    position_type = MultiInsertPosition

    def grid(self, behavior: Behavior) -> list[MultiInsertPosition]:
        return [MultiInsertPosition(after=tuple(self.after), length=self.span_length)]

    def plan(self, items: list[tuple[Behavior, Trajectory]], context: PlanningContext) -> list[PlannedEpisode]:
        """Insertion rounds: generate up to the next point, insert the next trajectory chunk, repeat."""
        contexts = {behavior.id: context.chat.prompt_ids(behavior.prompt) for behavior, _ in items}
        starts = {behavior_id: len(ids) for behavior_id, ids in contexts.items()}
        spans: dict[str, list[tuple[int, int]]] = {behavior_id: [] for behavior_id in contexts}
        previous = 0
        for round_index, after in enumerate(self.after):
            if after > previous:
                written = context.continue_greedily(contexts, after - previous)
                contexts = {behavior_id: ids + written[behavior_id] for behavior_id, ids in contexts.items()}
            for behavior, trajectory in items:
                chunk = trajectory.token_ids[round_index * self.span_length:(round_index + 1) * self.span_length]
                begin = len(contexts[behavior.id])
                contexts[behavior.id] = contexts[behavior.id] + chunk + context.defense_ids
                spans[behavior.id].append((begin, begin + len(chunk)))
            previous = after
        planned = []
        for behavior, trajectory in items:
            ids = contexts[behavior.id]
            (position,) = self.positions(behavior, trajectory)
            planned.append(context.episode(
                behavior, position, trunk=ids, branch=len(ids), depth=len(ids) - starts[behavior.id],
                answer_start=starts[behavior.id], injected_spans=spans[behavior.id],
            ))
        return planned
