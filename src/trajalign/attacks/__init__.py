"""Attacks: where harmful tokens enter the assistant turn, and how. One module per attack, registered here.

To add an attack, write its module (a `BaseAttack` subclass and its position type) and add the class to
`ATTACK_CLASSES`: the config union, the episode records and the CLI's `--attack` pick it up from there.
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from trajalign.attacks.adaptive import Adaptive, AdaptivePosition
from trajalign.attacks.base import BaseAttack, BasePosition, PlannedEpisode, PlanningContext
from trajalign.attacks.decoding import Decoding, DecodingPosition
from trajalign.attacks.defense import ReinjectHeader
from trajalign.attacks.finetune import Finetune, FinetunePosition
from trajalign.attacks.insert import Insert, InsertPosition
from trajalign.attacks.multi_insert import MultiInsert, MultiInsertPosition
from trajalign.attacks.prefill import Prefill, PrefillPosition
from trajalign.attacks.random_insert import RandomInsert, RandomInsertPosition

ATTACK_CLASSES: tuple[type[BaseAttack], ...] = (Prefill, Insert, MultiInsert, Decoding, RandomInsert, Adaptive,
                                                Finetune)
ATTACKS: dict[str, type[BaseAttack]] = {cls.model_fields["kind"].default: cls for cls in ATTACK_CLASSES}

Attack = Annotated[Union[ATTACK_CLASSES], Field(discriminator="kind")]  # noqa: UP007 - built from the registry
Position = Annotated[Union[tuple(dict.fromkeys(cls.position_type for cls in ATTACK_CLASSES))],  # noqa: UP007
                     Field(discriminator="kind")]

__all__ = ["ATTACKS", "ATTACK_CLASSES", "Adaptive", "AdaptivePosition", "Attack", "BaseAttack", "BasePosition",
           "Decoding", "DecodingPosition", "Finetune", "FinetunePosition", "Insert", "InsertPosition", "MultiInsert",
           "MultiInsertPosition", "PlannedEpisode", "PlanningContext", "Position", "Prefill", "PrefillPosition",
           "RandomInsert", "RandomInsertPosition", "ReinjectHeader"]
