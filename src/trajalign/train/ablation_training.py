"""Refusal-direction ablation during training (ReFAT, Yu et al. 2024; DeepRefusal 2025): harmful rows learn to
refuse while the model's current refusal direction is projected out of their residual stream.

The direction is the difference in means of the residual stream entering each block at the last prompt token,
between harmful and harmless training prompts (`trajalign.probe.direction.mean_activations`), one per block,
recomputed from the current model every few optimizer steps. Benign rows train with the ordinary loss.
"""

from __future__ import annotations

import os
import random
from dataclasses import replace
from pathlib import Path

import torch
from transformers import TrainerCallback

from trajalign.errors import InputError
from trajalign.probe.direction import mean_activations
from trajalign.probe.hooks import ablate_directions_where
from trajalign.train.objectives import Objective
from trajalign.train.recipes import BENIGN_KINDS, RecipeConfig, TrainingRow, build_rows


class RefusalAblation(Objective):
    """`refusal-ablation`: refusal rows on harmful prompts, a share of them trained with the refusal direction
    ablated (at every block, at all or at random token positions), and benign anchors."""

    columns = ("harmful",)

    def __init__(self):
        self.directions: torch.Tensor | None = None  # [blocks, hidden], one (not normalised) direction per block
        self.directions_step: int | None = None
        self._draws: tuple[int, torch.Generator] | None = None

    def build_rows(self, recipe: RecipeConfig, chat, harmful, benign, weights=None) -> list[TrainingRow]:
        if not harmful or not benign:
            raise InputError("recipe 'refusal-ablation': its refusal direction needs harmful and harmless prompts; "
                             "give benign prompts and a benign_ratio above 0")
        self.harmful_prompts = [prompt for _, prompt, _ in harmful]
        self.harmless_prompts = [prompt for _, prompt, _, _ in benign]
        return build_rows(recipe, chat, harmful, benign, weights)

    def row_columns(self, row: TrainingRow) -> dict[str, int]:
        return {"harmful": int(row.kind not in BENIGN_KINDS)}

    def prepare_model(self, handle, config) -> None:
        self.handle = handle
        self.settings = config.recipe.ablation
        self.seed = config.seed

    def callbacks(self, checkpoints: Path) -> list:
        return [DirectionRefresh(self, checkpoints)]

    def current_directions(self, model, step: int) -> torch.Tensor:
        """Difference in means at the last prompt token, per block, of `model` as it is now; the prompts are a
        sample fixed by the seed and the step, so that a resumed run draws the same ones."""
        rng = random.Random(f"{self.seed}-{step}")
        count = self.settings.direction_prompts
        harmful = rng.sample(self.harmful_prompts, min(count, len(self.harmful_prompts)))
        harmless = rng.sample(self.harmless_prompts, min(count, len(self.harmless_prompts)))
        current = replace(self.handle, model=model)
        was_training = model.training
        model.eval()
        try:
            difference = mean_activations(current, harmful) - mean_activations(current, harmless)
        finally:
            model.train(was_training)
        return difference[:, -1].float().clone()  # a clone leaves inference mode: the hooks' autograd may save it

    def refresh(self, model, step: int, checkpoints: Path, is_main: bool) -> None:
        """Make `directions` those of the last refresh step at or before `step`. A killed run's file for that step
        was computed from the same weights, so a resumed run reads it instead of the weights it no longer has."""
        due = step - step % self.settings.refresh_steps
        if due == self.directions_step:
            return
        path = checkpoints / f"refusal-directions-{due}.safetensors"
        if path.exists():
            from safetensors.torch import load_file

            self.directions = load_file(str(path))["directions"].to(next(model.parameters()).device)
        else:
            self.directions = self.current_directions(model, due)
            if is_main:
                _save_atomically(self.directions, path)
        self.directions_step = due

    def ablation_mask(self, inputs, step: int) -> torch.Tensor:
        """[batch, seq] positions to ablate: every (or a random share of the) real tokens of a random share of the
        harmful rows; the draws follow the seed and step, the same again after a resume."""
        if self._draws is None or self._draws[0] != step:
            self._draws = (step, torch.Generator().manual_seed(self.seed * 1_000_003 + step))
        generator = self._draws[1]
        tokens = inputs["attention_mask"].bool().cpu()
        chosen = inputs["harmful"].bool().cpu() & (torch.rand(tokens.shape[0], generator=generator)
                                                   < self.settings.probability)
        if self.settings.positions == "random":
            tokens &= torch.rand(tokens.shape, generator=generator) < self.settings.position_probability
        return (chosen[:, None] & tokens).to(inputs["attention_mask"].device)

    def compute_loss(self, trainer, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        where = self.ablation_mask(inputs, trainer.state.global_step)
        with ablate_directions_where(trainer.accelerator.unwrap_model(model), self.directions, where):
            return trainer.token_loss(model, inputs, return_outputs, num_items_in_batch)


class DirectionRefresh(TrainerCallback):
    """Recomputes the refusal direction at the start of training and every `refresh_steps` optimizer steps."""

    def __init__(self, objective: RefusalAblation, checkpoints: Path):
        self.objective = objective
        self.checkpoints = Path(checkpoints)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.objective.refresh(model, state.global_step, self.checkpoints, state.is_world_process_zero)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.objective.refresh(model, state.global_step, self.checkpoints, state.is_world_process_zero)


def _save_atomically(directions: torch.Tensor, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    save_file({"directions": directions.contiguous().cpu()}, str(partial))
    os.replace(partial, path)
