"""Trainer arguments whose names differ across the transformers releases that trajalign supports."""

from __future__ import annotations

import dataclasses


def no_activation_checkpointing(arguments_class) -> dict[str, bool]:
    """Keyword arguments that turn activation checkpointing off: TRL turns it on, and for small models the
    recomputation only costs time. transformers 5.x renamed `gradient_checkpointing` to `activation_checkpointing`
    and kept the old name as a deprecated alias; releases before the rename (5.17 among them) know only the old
    name, later ones warn on it."""
    names = {field.name for field in dataclasses.fields(arguments_class)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": False}
