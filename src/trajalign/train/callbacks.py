"""Trainer callbacks shared by the SFT and preference stages."""

from __future__ import annotations


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
