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
                     "prefix-constrained", "circuit-breaker", "refusal-ablation", "backtracking",
                     "harmful-sft", "benign-sft"]
RECIPES = get_args(RecipeName)
BENIGN_KINDS = frozenset({"anchor", "benign-prefix", "benign-insertion", "on-policy-anchor"})  # carry on
MAX_OWN_TOKENS = 8  # insertions: own tokens before the span, uniform in [1, this]


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
    benign_mix: dict[str, float] = Field(default={"plain": 1.0}, description="anchor rows and their shares: plain, "
                                         "prefix (the answer prefilled to depth k, trained to continue) and "
                                         "insertion (a span of another benign answer spliced in after j own "
                                         "tokens, trained to continue); k, j and the span length are drawn as "
                                         "for harmful rows")
    seed: int = 0

    @field_validator("mix")
    @classmethod
    def _known_kinds(cls, mix: dict[str, float]) -> dict[str, float]:
        return _shares(mix, {"prefix", "insertion", "plain", "rto"}, "mix")

    @field_validator("benign_mix")
    @classmethod
    def _known_benign_kinds(cls, mix: dict[str, float]) -> dict[str, float]:
        return _shares(mix, {"prefix", "insertion", "plain"}, "benign_mix")


def _shares(mix: dict[str, float], kinds: set[str], field: str) -> dict[str, float]:
    if set(mix) - kinds or not mix or any(weight < 0 for weight in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"{field} takes non-negative shares of {', '.join(sorted(kinds))}")
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

    def benign_prefix(self, prompt: list[int], answer: list[int], finished: bool, k: int,
                      behavior_id: str) -> TrainingRow:
        """The benign answer prefilled to depth k; the model is trained to carry on with the rest of it."""
        return self.row([(prompt, False), (answer[:k], False), (answer[k:] + (self.end if finished else []), True)],
                        "benign-prefix", behavior_id)

    def benign_insertion(self, prompt: list[int], answer: list[int], finished: bool, j: int, span: list[int],
                         behavior_id: str) -> TrainingRow:
        """j own tokens, then a span of another benign answer; the model is trained to carry on with its own:
        an interruption alone is no reason to refuse."""
        return self.row([(prompt, False), (answer[:j], False), (span, False),
                         (answer[j:] + (self.end if finished else []), True)], "benign-insertion", behavior_id)

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
               benign: list[tuple[str, str, list[int], bool]], weights: list[float] | None = None,
               harmful_row: HarmfulRow | None = None) -> list[TrainingRow]:
    """harmful: (id, prompt, trajectory ids); benign: (id, prompt, anchor answer ids, answer finished);
    weights: per benign prompt, how often it is drawn among the anchor rows relative to the others.

    `harmful_row(builder, rng, behavior_id, prompt ids, trajectory ids)` makes a comparator's own harmful rows;
    the benign anchors and their share are the same for every recipe."""
    rng = random.Random(config.seed)
    builder = RowBuilder(chat)
    harmful_row = harmful_row or partial(_harmful_row, config)
    rows = [harmful_row(builder, rng, behavior_id, chat.prompt_ids(prompt), trajectory)
            for behavior_id, prompt, trajectory in harmful]
    prompts = [chat.prompt_ids(prompt) for _, prompt, _, _ in benign]
    chosen = _sample_anchors(len(benign), round(config.benign_ratio * len(rows)), weights, rng)
    rows += [_benign_row(config, builder, rng, index, prompts[index], benign) for index in chosen]
    rng.shuffle(rows)
    return rows


def _sample_anchors(available: int, count: int, weights: list[float] | None, rng: random.Random) -> list[int]:
    """Indices of `count` anchor rows: every anchor the same number of times (give or take one) when there are
    fewer anchors than rows wanted, so that a benign ratio above what the anchors cover still weighs benign rows
    as asked; with unequal weights, each anchor's share of the rows follows its weight."""
    if not available:
        return []
    if weights is None or len(set(weights)) == 1:
        copies, remainder = divmod(count, available)
        return list(range(available)) * copies + rng.sample(range(available), remainder)
    total = sum(weights)
    quotas = [count * weight / total for weight in weights]
    chosen = [index for index, quota in enumerate(quotas) for _ in range(int(quota))]
    order = list(range(available))
    rng.shuffle(order)  # ties in the remainders go to a seeded random anchor, not the first one
    by_remainder = sorted(order, key=lambda index: quotas[index] - int(quotas[index]), reverse=True)
    return chosen + by_remainder[:count - len(chosen)]


def _benign_row(config: RecipeConfig, builder: RowBuilder, rng: random.Random, index: int, prompt: list[int],
                benign: list[tuple[str, str, list[int], bool]]) -> TrainingRow:
    """An anchor row, or (as `benign_mix` asks) the same answer perturbed the way harmful rows are."""
    behavior_id, _, answer, finished = benign[index]
    kind = "plain"
    if set(config.benign_mix) != {"plain"}:  # no draw otherwise, so the default rows stay what they were
        kinds, shares = zip(*config.benign_mix.items())
        kind = rng.choices(kinds, shares)[0]
    if kind == "plain" or len(answer) < 2:
        return builder.anchor(prompt, answer, finished, behavior_id)
    if kind == "prefix":
        k = rng.randint(1, min(config.max_prefix, len(answer) - 1))
        return builder.benign_prefix(prompt, answer, finished, k, behavior_id)
    foreigners = [other_answer for other_id, _, other_answer, _ in benign if other_id != behavior_id and other_answer]
    if not foreigners:
        return builder.anchor(prompt, answer, finished, behavior_id)
    foreign = rng.choice(foreigners)
    length = rng.randint(1, min(config.max_span, len(foreign)))
    start = rng.randint(0, len(foreign) - length)
    j = rng.randint(1, min(MAX_OWN_TOKENS, len(answer) - 1))
    return builder.benign_insertion(prompt, answer, finished, j, foreign[start:start + length], behavior_id)


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
            cuts.append((rng.randint(1, MAX_OWN_TOKENS), rng.randint(0, len(trajectory) - length), length))
        return builder.insertion_recovery(prompt, trajectory, cuts, rng, behavior_id)
    positions = {m for m in range(len(trajectory)) if rng.random() < config.rto_fraction}
    return builder.rto(prompt, trajectory, positions, rng, behavior_id)


def _add_rto_labels(row: TrainingRow, start: int, k: int, builder: RowBuilder, rng, fraction: float) -> None:
    for m in range(1, k):
        if rng.random() < fraction:
            row.labels[start + m] = builder.recoveries[0][0]
