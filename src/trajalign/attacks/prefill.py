"""Prefill: the answer starts with the first k tokens of a harmful trajectory, and the model continues."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from trajalign.attacks.base import BaseAttack, BasePosition, PlannedEpisode, PlanningContext, sorted_counts
from trajalign.data.datasets import Behavior
from trajalign.data.trajectories import Trajectory
from trajalign.errors import InputError


class PrefillPosition(BasePosition):
    kind: Literal["prefill"] = "prefill"
    depth: int
    label_format = "depth={depth}"


class Prefill(BaseAttack):
    """The answer starts with the first `depth` trajectory tokens; the model continues."""

    kind: Literal["prefill"] = "prefill"
    depths: list[int] = Field(default=[0, 5, 10, 20, 40], description="prefix lengths in target-model tokens")
    position_type = PrefillPosition

    @field_validator("depths")
    @classmethod
    def _non_negative(cls, depths: list[int]) -> list[int]:
        return sorted_counts(depths)

    def needs_trajectories(self) -> bool:
        return max(self.depths) > 0

    def grid(self, behavior: Behavior) -> list[PrefillPosition]:
        return [PrefillPosition(depth=depth) for depth in self.depths]

    def tokens_needed(self, position: PrefillPosition) -> int:
        return position.depth

    def headline(self, position: PrefillPosition) -> str:
        return "k=0" if position.depth == 0 else "k>=1"

    def check(self, trajectories: list[Trajectory]) -> None:
        longest = max(len(trajectory.token_ids) for trajectory in trajectories)
        for depth in self.depths:
            if depth > longest:
                raise InputError(f"depth {depth}: beyond every trajectory (longest {longest} tokens); lower it or "
                                 f"use longer trajectories (--trajectory-tokens)")

    def plan(self, items: list[tuple[Behavior, Trajectory]], context: PlanningContext) -> list[PlannedEpisode]:
        """Every depth of a trajectory branches from one trunk: the prompt and the trajectory to its deepest depth."""
        planned = []
        for behavior, trajectory in items:
            prompt = context.chat.prompt_ids(behavior.prompt)
            positions = self.positions(behavior, trajectory)
            trunk = prompt + trajectory.token_ids[:max((position.depth for position in positions), default=0)]
            planned += [context.episode(
                behavior, position, trunk=trunk, branch=len(prompt) + position.depth, suffix=context.defense_ids,
                depth=position.depth, answer_start=len(prompt),
                injected_spans=[(len(prompt), len(prompt) + position.depth)] if position.depth else [],
            ) for position in positions]
        return planned
