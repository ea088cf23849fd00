"""What every attack is: a serialisable plan that names its positions and plans its own generation requests."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar

from pydantic import BaseModel, ConfigDict

from trajalign.backends.base import Backend, GenerationRequest, Sampling
from trajalign.data.datasets import Behavior
from trajalign.data.trajectories import Trajectory

if TYPE_CHECKING:
    from trajalign.models.chat import ChatFormat
    from trajalign.models.loading import TokenizerHandle


class BasePosition(BaseModel):
    """Where in an attack's grid one episode lies. `label` names it in episode keys, summaries and tables: by
    default `label_format` filled with the position's fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: str
    sample: int = 0  # the draw, for attacks that sample several continuations per setting
    label_format: ClassVar[str]

    @property
    def label(self) -> str:
        return self.label_format.format(**dict(self))


@dataclass
class PlannedEpisode:
    """One episode ready to generate: its request, and where in its context the attack put what."""

    key: str
    behavior: Behavior
    position: BasePosition
    depth: int  # assistant tokens before the continuation
    request: GenerationRequest
    answer_start: int
    injected_spans: list[tuple[int, int]]
    model: str | None = None  # a model the attack derived from the evaluated one (fine-tuned) that runs this


@dataclass
class PlanningContext:
    """What an attack plans with: the chat format, the backend (for the model's own tokens), the episode keys,
    the tokens a defense appends after every injection, and the continuation length. White-box attacks read the
    evaluated model through `handle` (a ModelHandle where the backend runs the weights locally); attacks that
    prepare something (a fine-tuned model) keep it under `workdir`, the run directory."""

    chat: ChatFormat
    backend: Backend
    key: Callable[[Behavior, BasePosition], str]
    defense_ids: list[int] = field(default_factory=list)
    max_new_tokens: int = 64
    handle: TokenizerHandle | None = None
    workdir: Path | None = None
    model_spec: str | None = None  # the evaluated model's spec, for attacks that derive models from it

    def episode(self, behavior: Behavior, position: BasePosition, trunk: list[int], branch: int, depth: int,
                answer_start: int, injected_spans: list[tuple[int, int]], suffix: list[int] | None = None,
                sampling: Sampling = Sampling()) -> PlannedEpisode:
        """An episode that continues `trunk[:branch] + suffix`."""
        key = self.key(behavior, position)
        request = GenerationRequest(key=key, trunk=trunk, branch=branch, suffix=list(suffix or []),
                                    sampling=sampling, max_new_tokens=self.max_new_tokens)
        return PlannedEpisode(key=key, behavior=behavior, position=position, depth=depth, request=request,
                              answer_start=answer_start, injected_spans=injected_spans)

    def continue_greedily(self, contexts: dict[str, list[int]], max_new_tokens: int) -> dict[str, list[int]]:
        """The model's own greedy continuation of each context, from the backend that runs the attack."""
        requests = [GenerationRequest(key=key, trunk=ids, branch=len(ids), max_new_tokens=max_new_tokens)
                    for key, ids in contexts.items()]
        return {result.key: result.continuation_ids for batch in self.backend.generate(requests) for result in batch}


def sorted_counts(values: list[int], minimum: int = 0) -> list[int]:
    """A grid of token counts, steps or budgets: non-empty, each at least `minimum`, sorted, without repeats."""
    if not values or any(value < minimum for value in values):
        raise ValueError(f"must be a non-empty list of numbers >= {minimum}")
    return sorted(set(values))


def seeded_rng(*parts: object) -> random.Random:
    """A random generator seeded by `parts` alone (e.g. attack seed, behavior id, sample): the same draws in any
    batch, on any model and on resume."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()
    return random.Random(int(digest[:16], 16))


class BaseAttack(BaseModel):
    """An attack owns what it does: the positions it yields for a behavior and the requests that realise them.

    A subclass declares `kind` (a Literal, its registry name) first, its settings after, and `position_type`.
    """

    model_config = ConfigDict(extra="forbid")
    position_type: ClassVar[type[BasePosition]]
    accepts_defense: ClassVar[bool] = True  # whether a defense can follow its injections

    def needs_trajectories(self) -> bool:
        return True

    def grid(self, behavior: Behavior) -> list[BasePosition]:
        """Every position this attack asks for on `behavior`, whatever its trajectory."""
        raise NotImplementedError

    def tokens_needed(self, position: BasePosition) -> int:
        """Trajectory tokens a position consumes; positions that need more than a trajectory has are skipped."""
        return 0

    def positions(self, behavior: Behavior, trajectory: Trajectory) -> list[BasePosition]:
        """The positions `behavior` yields with `trajectory`, in planning order, without generating anything."""
        return [position for position in self.grid(behavior)
                if self.tokens_needed(position) <= len(trajectory.token_ids)]

    def headline(self, position: BasePosition) -> str | None:
        """The row of the attacks x models table this position's episodes count in ('' for the attack's one row;
        None leaves them out, e.g. the smaller budgets of a search)."""
        return ""

    def check(self, trajectories: list[Trajectory]) -> None:
        """Raise an InputError for settings no trajectory can serve."""

    def plan(self, items: list[tuple[Behavior, Trajectory]], context: PlanningContext) -> list[PlannedEpisode]:
        """Requests for every position of every (behavior, trajectory) pair, token-exactly."""
        raise NotImplementedError
