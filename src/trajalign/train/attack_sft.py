"""The rows of fine-tuning attacks (Qi et al. 2024): harmful SFT on harmful answers, benign SFT on human answers.

Neither trains a refusal: harmful SFT teaches the model to comply (prompt + a harmful trajectory, the whole
trajectory trained), benign SFT is ordinary instruction tuning (prompt + the dataset's answer), which Qi et al.
found erodes alignment too. They run through the same trainer as every recipe, for a few steps.
"""

from __future__ import annotations

import random

from trajalign.train.objectives import Objective
from trajalign.train.recipes import RecipeConfig, RowBuilder, TrainingRow


class HarmfulSFT(Objective):
    """One row per harmful behavior: its prompt, then its trajectory as the trained answer."""

    def build_rows(self, recipe: RecipeConfig, chat, harmful, benign, weights=None) -> list[TrainingRow]:
        builder = RowBuilder(chat)
        rows = [builder.row([(chat.prompt_ids(prompt), False), (trajectory, True)], "harmful-sft", behavior_id)
                for behavior_id, prompt, trajectory in harmful if trajectory]
        random.Random(recipe.seed).shuffle(rows)
        return rows


class BenignSFT(Objective):
    """One row per benign prompt: its answer (the anchor answer, e.g. the dataset's own) trained, nothing else."""

    def build_rows(self, recipe: RecipeConfig, chat, harmful, benign, weights=None) -> list[TrainingRow]:
        builder = RowBuilder(chat)
        rows = [builder.anchor(chat.prompt_ids(prompt), answer, finished, behavior_id)
                for behavior_id, prompt, answer, finished in benign]
        random.Random(recipe.seed).shuffle(rows)
        return rows
