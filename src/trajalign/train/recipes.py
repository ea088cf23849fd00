"""Recipes: behaviors + trajectories -> pre-tokenized rows (`input_ids`, `labels` = -100 outside the trained span)."""

from __future__ import annotations

import random
from functools import partial
from typing import Callable, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from trajalign.refusals import REFUSALS
from trajalign.train.comparators import AblationSettings, BacktrackingSettings, ReroutingSettings

IGNORE = -100

RecipeName = Literal["refusal-sft", "prefix-recovery", "insertion-recovery", "rto", "trajectory",
                     "prefix-constrained", "circuit-breaker", "refusal-ablation", "backtracking"]
RECIPES = get_args(RecipeName)


class TrainingRow(BaseModel):
    input_ids: list[int]
    labels: list[int]
    kind: str
    behavior_id: str


class RecipeConfig(BaseModel):
    """How harmful and benign examples become training rows; every field has the default used in the study."""

    model_config = ConfigDict(extra="forbid")
    name: RecipeName = "trajectory"
    prefix_probability: float = Field(default=0.5, ge=0, le=1, description="prefix-recovery, prefix-constrained, "
                                      "backtracking: share of harmful rows with a harmful prefix")
    max_prefix: int = Field(default=100, gt=0, description="prefix length k is uniform in [1, min(this, length)]")
    max_span: int = Field(default=20, gt=0, description="insertion: harmful span length L uniform in [1, this]")
    insertions: int = Field(default=1, gt=0, description="insertion: perturbation points per answer")
    rto_fraction: float = Field(default=1.0, gt=0, le=1, description="rto: share of trajectory positions labelled")
    mix: dict[str, float] = Field(default={"prefix": 0.35, "insertion": 0.35, "plain": 0.3},
                                  description="trajectory recipe: row kinds and their shares")
    benign_ratio: float = Field(default=0.75, ge=0, description="benign anchor rows per harmful row; anchors "
                                "repeat when there are fewer of them than that")
    rerouting: ReroutingSettings = Field(default_factory=ReroutingSettings, description="circuit-breaker")
    ablation: AblationSettings = Field(default_factory=AblationSettings, description="refusal-ablation")
    backtracking: BacktrackingSettings = Field(default_factory=BacktrackingSettings, description="backtracking")
    seed: int = 0

    @field_validator("mix")
    @classmethod
    def _known_kinds(cls, mix: dict[str, float]) -> dict[str, float]:
        unknown = set(mix) - {"prefix", "insertion", "plain", "rto"}
        if unknown or not mix or any(weight < 0 for weight in mix.values()) or sum(mix.values()) <= 0:
            raise ValueError("mix takes non-negative shares of prefix, insertion, plain and rto")
        return mix


class RowBuilder:
    """Builds rows token-exactly: every piece is a list of ids, concatenated, never decoded and re-encoded."""

    def __init__(self, chat, refusals: tuple[str, ...] = REFUSALS):
        self.chat = chat
        self.refusals = [chat.encode_span(text) for text in refusals]
        self.recoveries = [chat.encode_span(" " + text) for text in refusals]
        self.end = [chat.end_of_turn_ids[0]]
        self.openings = sorted({ids[0] for ids in self.refusals} | {ids[0] for ids in self.recoveries})

    @staticmethod
    def row(pieces: list[tuple[list[int], bool]], kind: str, behavior_id: str) -> TrainingRow:
        """Concatenate (ids, trained) pieces; labels copy the ids of trained pieces and ignore the rest."""
        input_ids, labels = [], []
        for ids, trained in pieces:
            input_ids += ids
            labels += ids if trained else [IGNORE] * len(ids)
        return TrainingRow(input_ids=input_ids, labels=labels, kind=kind, behavior_id=behavior_id)

    def refusal(self, prompt: list[int], rng: random.Random, behavior_id: str) -> TrainingRow:
        return self.row([(prompt, False), (rng.choice(self.refusals) + self.end, True)], "refusal", behavior_id)

    def anchor(self, prompt: list[int], answer: list[int], finished: bool, behavior_id: str) -> TrainingRow:
        return self.row([(prompt, False), (answer + (self.end if finished else []), True)], "anchor", behavior_id)

    def prefix_recovery(self, prompt, trajectory, k: int, rng, behavior_id: str) -> TrainingRow:
        return self.row([(prompt, False), (trajectory[:k], False), (rng.choice(self.recoveries) + self.end, True)],
                        "prefix", behavior_id)

    def insertion_recovery(self, prompt, trajectory, cuts: list[tuple[int, int, int]], rng,
                           behavior_id: str) -> TrainingRow:
        """cuts: (own tokens j, span start, span length L) per insertion; own tokens open a refusal."""
        pieces = [(prompt, False)]
        own = rng.choice(self.refusals)
        for index, (j, start, length) in enumerate(cuts):
            pieces.append((own[:j], index > 0))
            pieces.append((trajectory[start:start + length], False))
            own = rng.choice(self.recoveries)
        pieces.append((own + self.end, True))
        return self.row(pieces, "insertion", behavior_id)

    def rto(self, prompt, trajectory, positions: set[int], rng, behavior_id: str) -> TrainingRow:
        """DeRTa's Reinforced Transition Optimization: after every (sampled) trajectory prefix, the label is a
        refusal-opening token; the whole trajectory then ends in a recovery. One forward pass covers all."""
        refusal_opening = rng.choice(self.refusals)[0]
        recovery = rng.choice(self.recoveries)
        row = self.row([(prompt, False), (trajectory, False), (recovery + self.end, True)], "rto", behavior_id)
        start = len(prompt)
        for m in positions:  # label at index start+m: the token predicted after prompt + trajectory[:m]
            row.labels[start + m] = refusal_opening if m == 0 else recovery[0]
        return row


HarmfulRow = Callable[[RowBuilder, random.Random, str, list[int], list[int]], TrainingRow]


def build_rows(config: RecipeConfig, chat, harmful: list[tuple[str, str, list[int]]],
               benign: list[tuple[str, str, list[int], bool]], harmful_row: HarmfulRow | None = None
               ) -> list[TrainingRow]:
    """harmful: (id, prompt, trajectory ids); benign: (id, prompt, anchor answer ids, answer finished).

    `harmful_row(builder, rng, behavior_id, prompt ids, trajectory ids)` makes a comparator's own harmful rows;
    the benign anchors and their share are the same for every recipe."""
    rng = random.Random(config.seed)
    builder = RowBuilder(chat)
    harmful_row = harmful_row or partial(_harmful_row, config)
    rows = [harmful_row(builder, rng, behavior_id, chat.prompt_ids(prompt), trajectory)
            for behavior_id, prompt, trajectory in harmful]
    anchors = [builder.anchor(chat.prompt_ids(prompt), answer, finished, behavior_id)
               for behavior_id, prompt, answer, finished in benign]
    rows += _sample_anchors(anchors, round(config.benign_ratio * len(rows)), rng)
    rng.shuffle(rows)
    return rows


def _sample_anchors(anchors: list[TrainingRow], count: int, rng: random.Random) -> list[TrainingRow]:
    """`count` anchor rows: every anchor the same number of times (give or take one) when there are fewer anchors
    than rows wanted, so that a benign ratio above what the anchors cover still weighs benign rows as asked."""
    if not anchors:
        return []
    copies, remainder = divmod(count, len(anchors))
    return anchors * copies + rng.sample(anchors, remainder)


def _harmful_row(config: RecipeConfig, builder: RowBuilder, rng: random.Random, behavior_id: str,
                 prompt: list[int], trajectory: list[int]) -> TrainingRow:
    kind = {"refusal-sft": "plain", "prefix-recovery": "prefix", "insertion-recovery": "insertion",
            "rto": "rto", "prefix-constrained": "prefix", "refusal-ablation": "plain"}.get(config.name)
    if kind == "prefix" and rng.random() >= config.prefix_probability:
        kind = "plain"
    if kind is None:
        kinds, weights = zip(*config.mix.items())
        kind = rng.choices(kinds, weights)[0]
    if not trajectory or kind == "plain":
        return builder.refusal(prompt, rng, behavior_id)
    if kind == "prefix":
        k = rng.randint(1, min(config.max_prefix, len(trajectory)))
        row = builder.prefix_recovery(prompt, trajectory, k, rng, behavior_id)
        if config.name == "trajectory":  # RTO on the prefix, in the same forward pass
            _add_rto_labels(row, len(prompt), k, builder, rng, config.rto_fraction)
        return row
    if kind == "insertion":
        cuts = []
        for _ in range(config.insertions):
            length = rng.randint(1, min(config.max_span, len(trajectory)))
            cuts.append((rng.randint(1, 8), rng.randint(0, len(trajectory) - length), length))
        return builder.insertion_recovery(prompt, trajectory, cuts, rng, behavior_id)
    positions = {m for m in range(len(trajectory)) if rng.random() < config.rto_fraction}
    return builder.rto(prompt, trajectory, positions, rng, behavior_id)


def _add_rto_labels(row: TrainingRow, start: int, k: int, builder: RowBuilder, rng, fraction: float) -> None:
    for m in range(1, k):
        if rng.random() < fraction:
            row.labels[start + m] = builder.recoveries[0][0]
