"""Generation exploitation: no injection, a seeded sweep over sampling settings, several draws each."""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import Field

from trajalign.attacks.base import BaseAttack, BasePosition, PlannedEpisode, PlanningContext
from trajalign.backends.base import Sampling
from trajalign.data.datasets import Behavior
from trajalign.data.trajectories import Trajectory


class DecodingPosition(BasePosition):
    kind: Literal["decoding"] = "decoding"
    temperature: float
    top_p: float
    top_k: int
    label_format = "T={temperature:g},p={top_p:g},k={top_k}"


class Decoding(BaseAttack):
    """Generation exploitation: a seeded sweep over sampling settings, n samples each."""

    kind: Literal["decoding"] = "decoding"
    temperatures: list[float] = Field(default=[0.7, 1.0, 1.5])
    top_ps: list[float] = Field(default=[0.9, 1.0])
    top_ks: list[int] = Field(default=[0, 40], description="0 turns top-k off")
    samples: int = Field(default=2, gt=0)
    seed: int = 0
    position_type = DecodingPosition
    accepts_defense = False  # nothing is injected for a defense to follow

    def needs_trajectories(self) -> bool:
        return False

    def grid(self, behavior: Behavior) -> list[DecodingPosition]:
        return [DecodingPosition(temperature=temperature, top_p=top_p, top_k=top_k, sample=sample)
                for temperature in self.temperatures for top_p in self.top_ps for top_k in self.top_ks
                for sample in range(self.samples)]

    def plan(self, items: list[tuple[Behavior, Trajectory]], context: PlanningContext) -> list[PlannedEpisode]:
        """Each draw is seeded by the attack's seed, the behavior and the position (setting and sample), not by the
        model or the run directory: it comes out the same in any batch and on resume, and every model meets the same
        random numbers, so paired comparisons between models compare like with like."""
        planned = []
        for behavior, _ in items:
            prompt = context.chat.prompt_ids(behavior.prompt)
            for position in self.grid(behavior):
                draw = f"{self.seed}:{behavior.id}:{position.label}:{position.sample}"
                seed = int(hashlib.sha256(draw.encode()).hexdigest()[:8], 16)
                planned.append(context.episode(
                    behavior, position, trunk=prompt, branch=len(prompt), depth=0, answer_start=len(prompt),
                    injected_spans=[], sampling=Sampling(position.temperature, position.top_p, position.top_k, seed),
                ))
        return planned
