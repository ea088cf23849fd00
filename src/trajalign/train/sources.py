"""Training prompt sources: several harmful or benign datasets, each with its own row limit (and, for anchors, a
weight and where their answers come from)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from trajalign.data.datasets import BUNDLED, Behavior, load_behaviors
from trajalign.errors import InputError

AnchorAnswers = Literal["self", "reference"]


class HarmfulSource(BaseModel):
    """A dataset of harmful behaviors to train on; `name:N` in a config or on the command line sets the limit."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="bundled dataset name or a file")
    limit: int | None = Field(default=None, gt=0, description="first N rows of this source")

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value):
        return parse_source(value)


class AnchorSource(HarmfulSource):
    """A dataset of benign prompts whose answers become anchor rows."""

    weight: float = Field(default=1.0, gt=0, description="anchor rows of this source relative to others', per "
                          "prompt: 3 puts each of its prompts among the anchor rows three times as often")
    answers: AnchorAnswers | None = Field(default=None, description="self: the original model's greedy answer; "
                                          "reference: the dataset's own answer; unset: the config's anchor_answers")


def parse_source(value):
    """'name' or 'name:N' -> {'name', 'limit'}; a file path may hold colons, so only a numeric tail is a limit."""
    if not isinstance(value, str):
        return value
    name, _, tail = value.rpartition(":")
    if name and tail.isdigit():
        return {"name": name, "limit": int(tail)}
    return {"name": value}


def dataset_name(source: str) -> str:
    """The `dataset` field that behaviors loaded from `source` carry (a file's stem, a bundled set's name)."""
    return source if source in BUNDLED else Path(source).stem


def load_sources(sources: list[HarmfulSource], default_limit: int | None = None) -> list[Behavior]:
    """Behaviors of every source in order, each cut to its own limit (or `default_limit`); datasets meant for
    evaluation only are refused, and so is an id that two sources share."""
    behaviors, origin = [], {}
    for source in sources:
        if source.name in BUNDLED and not BUNDLED[source.name].training_allowed:
            raise InputError(f"dataset '{source.name}': its authors ask that it be used for evaluation only, "
                             f"not training")
        for behavior in load_behaviors(source.name, limit=source.limit or default_limit):
            if behavior.id in origin:
                raise InputError(f"dataset '{source.name}' behavior '{behavior.id}' field 'id': also in "
                                 f"'{origin[behavior.id]}'; training sources need distinct ids")
            origin[behavior.id] = source.name
            behaviors.append(behavior)
    return behaviors
