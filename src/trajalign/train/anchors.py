"""Anchor answers for benign prompts: the original model's own greedy answer, or the dataset's reference answer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trajalign.data.datasets import Behavior
from trajalign.data.trajectories import generate_answers
from trajalign.errors import InputError
from trajalign.train.sources import AnchorAnswers, AnchorSource, dataset_name


@dataclass(frozen=True)
class Anchor:
    """A benign prompt and the answer its anchor rows train on, in the target model's tokens."""

    behavior: Behavior
    answer: list[int]
    finished: bool  # the whole answer fits: its rows end with the end-of-turn token
    weight: float = 1.0

    def as_tuple(self) -> tuple[str, str, list[int], bool]:
        return self.behavior.id, self.behavior.prompt, self.answer, self.finished


def source_of(behavior: Behavior, sources: list[AnchorSource]) -> AnchorSource | None:
    return next((source for source in sources if dataset_name(source.name) == behavior.dataset), None)


def reference_answer(tokenizer, behavior: Behavior, max_tokens: int) -> tuple[list[int], bool]:
    """The dataset's answer tokenized on its own, cut to `max_tokens`.

    Dataset text need not round-trip through the tokenizer (whitespace may normalise); what matters is that the
    row's ids are the ids trained on, and these are never decoded and re-encoded.
    """
    if not behavior.reference or not behavior.reference.strip():
        raise InputError(f"dataset '{behavior.dataset}' behavior '{behavior.id}' field 'reference': empty, so it "
                         f"gives no anchor answer (use answers: self for this source)")
    ids = list(tokenizer(behavior.reference, add_special_tokens=False)["input_ids"])
    return ids[:max_tokens], len(ids) <= max_tokens


def build_anchors(handle, behaviors: list[Behavior], sources: list[AnchorSource], default_answers: AnchorAnswers,
                  max_tokens: int, batch_size: int, cache_dir: Path | None, progress=None) -> list[Anchor]:
    """One anchor per benign behavior, answered as its source says (`default_answers` when no source names it).

    Self-distilled answers are generated greedily by `handle`'s model (the original one) and cached;
    `progress(done, total, "answers")` follows their generation.
    """
    settings = {behavior.id: source_of(behavior, sources) for behavior in behaviors}
    answers_of = {behavior.id: (settings[behavior.id] and settings[behavior.id].answers) or default_answers
                  for behavior in behaviors}
    # dataset answers first: a missing one is an input error, found before minutes of generation
    answers = {behavior.id: reference_answer(handle.tokenizer, behavior, max_tokens) for behavior in behaviors
               if answers_of[behavior.id] == "reference"}
    distilled = [behavior for behavior in behaviors if answers_of[behavior.id] == "self"]
    if distilled:
        generated = generate_answers(handle, distilled, max_tokens, batch_size, cache_dir=cache_dir,
                                     progress=progress)
        answers.update({behavior_id: (ids, len(ids) < max_tokens) for behavior_id, ids in generated.items()})
    return [Anchor(behavior, *answers[behavior.id],
                   weight=settings[behavior.id].weight if settings[behavior.id] else 1.0) for behavior in behaviors]
