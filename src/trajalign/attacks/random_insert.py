"""Random insertion (Lyu et al. 2026): short harmful spans spliced in at random points of the model's own answer.

The model first writes its own greedy answer (`own_tokens` long, refusals included). Each episode draws, from a
seed of its own (attack seed, behavior, sample), `insertions` points in that answer and as many spans, each a
random window of the harmful trajectory with a length drawn from `span_lengths`. The context is the prompt and the
own answer with the spans spliced in, cut after the last span: the model continues from there.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from trajalign.attacks.base import BaseAttack, BasePosition, PlannedEpisode, PlanningContext, seeded_rng
from trajalign.data.datasets import Behavior
from trajalign.data.trajectories import Trajectory


class RandomInsertPosition(BasePosition):
    """One seeded draw; `after` (own tokens before each span) and `windows` ([start, end) in the trajectory) are
    filled in when the episode is planned, so the record says exactly what went where."""

    kind: Literal["random-insert"] = "random-insert"
    insertions: int
    after: tuple[int, ...] = ()
    windows: tuple[tuple[int, int], ...] = ()
    label_format = "random x{insertions}"


class RandomInsert(BaseAttack):
    """Spans of the harmful trajectory spliced in at seeded random points of the model's own answer."""

    kind: Literal["random-insert"] = "random-insert"
    insertions: int = Field(default=1, gt=0, description="spans spliced into each answer")
    span_lengths: tuple[int, int] = Field(default=(5, 15), description="span length drawn uniformly from [low, high]")
    own_tokens: int = Field(default=32, gt=0, description="length of the model's own answer the spans go into")
    min_after: int = Field(default=1, ge=0, description="own tokens before the first point at least")
    samples: int = Field(default=4, gt=0, description="episodes per behavior, each with its own draw")
    seed: int = 0
    position_type = RandomInsertPosition

    @model_validator(mode="after")
    def _ranges(self) -> RandomInsert:
        low, high = self.span_lengths
        if not 0 < low <= high:
            raise ValueError("span_lengths must be [low, high] with 0 < low <= high")
        if self.min_after > self.own_tokens:
            raise ValueError("min_after must not exceed own_tokens")
        return self

    def grid(self, behavior: Behavior) -> list[RandomInsertPosition]:
        return [RandomInsertPosition(insertions=self.insertions, sample=sample) for sample in range(self.samples)]

    def headline(self, position: RandomInsertPosition) -> str:
        """One row per number of spans: one insertion and three are different attacks."""
        return f"x{position.insertions}"

    def tokens_needed(self, position: RandomInsertPosition) -> int:
        return 1

    def draw(self, behavior_id: str, sample: int, own_length: int,
             trajectory_length: int) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
        """The seeded points (sorted own-token counts) and trajectory windows of one episode. Seeded by behavior
        and sample, not by model: models whose own answers have the same length get the same draw."""
        rng = seeded_rng(self.seed, behavior_id, sample)
        low = min(self.min_after, own_length)
        points = tuple(sorted(rng.randint(low, own_length) for _ in range(self.insertions)))
        windows = []
        for _ in range(self.insertions):
            length = min(rng.randint(*self.span_lengths), trajectory_length)
            start = rng.randint(0, trajectory_length - length)
            windows.append((start, start + length))
        return points, tuple(windows)

    def plan(self, items: list[tuple[Behavior, Trajectory]], context: PlanningContext) -> list[PlannedEpisode]:
        prompts = {behavior.id: context.chat.prompt_ids(behavior.prompt) for behavior, _ in items}
        own = context.continue_greedily(prompts, self.own_tokens)
        planned = []
        for behavior, trajectory in items:
            prompt, answer = prompts[behavior.id], own[behavior.id]
            for position in self.positions(behavior, trajectory):
                after, windows = self.draw(behavior.id, position.sample, len(answer), len(trajectory.token_ids))
                context_ids, spans, written = list(prompt), [], 0
                for point, (start, end) in zip(after, windows):
                    context_ids += answer[written:point]
                    spans.append((len(context_ids), len(context_ids) + end - start))
                    context_ids += trajectory.token_ids[start:end] + context.defense_ids
                    written = point
                planned.append(context.episode(
                    behavior, position.model_copy(update={"after": after, "windows": windows}), trunk=context_ids,
                    branch=len(context_ids), depth=len(context_ids) - len(prompt), answer_start=len(prompt),
                    injected_spans=spans))
        return planned
