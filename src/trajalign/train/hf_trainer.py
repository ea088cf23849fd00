"""What every transformers Trainer that trajalign builds (SFT and DPO) shares: an argument whose name differs
across the supported transformers releases, and a callback."""

from __future__ import annotations

import dataclasses


def no_activation_checkpointing(arguments_class) -> dict[str, bool]:
    """Keyword arguments that turn activation checkpointing off: TRL turns it on, and for small models the
    recomputation only costs time. transformers 5.x renamed `gradient_checkpointing` to `activation_checkpointing`
    and kept the old name as a deprecated alias; releases before the rename (5.17 among them) know only the old
    name, later ones warn on it."""
    names = {field.name for field in dataclasses.fields(arguments_class)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": False}


def no_final_checkpoint():
    """A trainer callback that skips the checkpoint transformers writes after the last step. That one is a resume
    point, the model with its optimizer state (about 2.5 times the model on disk), but the caller saves the model
    and deletes the checkpoints right after, so it would only cost the writes (9 of the smoke preset's 17 s of
    training). A run killed in between resumes from its last periodic checkpoint."""
    from transformers import TrainerCallback

    class NoFinalCheckpoint(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_save = False

    return NoFinalCheckpoint()
