"""Training objectives: what a recipe trains beyond its rows (loss, model set-up, periodic work), one per recipe."""

from __future__ import annotations

from trajalign.train.losses import ConstrainedSettings
from trajalign.train.recipes import RecipeConfig, TrainingRow, build_rows


class Objective:
    """Cross-entropy at labelled tokens, or Qi et al.'s constrained loss when the config asks for it.

    The trainer calls these hooks in order: `configure`, `build_rows`, `row_columns` (per row), `prepare_model`,
    `lora_options`, `learning_rate_scales`, `callbacks`, then `compute_loss` per batch. A comparator overrides
    those it needs.
    """

    columns: tuple[str, ...] = ()  # per-row integers the loss reads besides input_ids and labels
    # Batches of rows of similar length waste less compute on padding; a loss with a term per kind of row may
    # need every batch to mix the kinds instead.
    length_grouped_batches: bool = True

    def configure(self, config):
        """The TrainConfig this method trains with: settings it fixes (LoRA, the constrained loss) filled in."""
        return config

    def build_rows(self, recipe: RecipeConfig, chat, harmful: list[tuple[str, str, list[int]]],
                   benign: list[tuple[str, str, list[int], bool]], weights: list[float] | None = None
                   ) -> list[TrainingRow]:
        return build_rows(recipe, chat, harmful, benign, weights)

    def row_columns(self, row: TrainingRow) -> dict[str, int]:
        return {}

    def batch_columns(self, batch: list[dict]) -> dict:
        import torch

        return {name: torch.tensor([row[name] for row in batch]) for name in self.columns}

    def prepare_model(self, handle, config) -> None:
        """Called on the model to train (`handle.model`) after embeddings are frozen and before LoRA wraps it."""

    def lora_options(self, model) -> dict:
        """peft.LoraConfig arguments beyond, or instead of, those of the config's LoRA settings."""
        return {}

    def learning_rate_scales(self, model) -> list[tuple]:
        """(parameter, factor) pairs: parameters of the model being trained that learn at factor x the rate."""
        return []

    def callbacks(self, checkpoints) -> list:
        """transformers TrainerCallbacks; `checkpoints` is the folder that a killed run resumes from."""
        return []

    def compute_loss(self, trainer, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        return trainer.token_loss(model, inputs, return_outputs, num_items_in_batch)


class PrefixConstrained(Objective):
    """Qi et al. 2024 as one comparator: harmful-prefix augmentation (prefix-recovery rows, a prefix of 1..100
    tokens in half of the harmful rows, the plain refusal in the others) trained with the token-wise constrained
    loss and its beta schedule against the frozen original, unless the config names other constrained settings."""

    def configure(self, config):
        if config.constrained is not None:
            return config
        return config.model_copy(update={"constrained": ConstrainedSettings()})


def objective_for(recipe: str) -> Objective:
    from trajalign.train.ablation_training import RefusalAblation
    from trajalign.train.attack_sft import BenignSFT, HarmfulSFT
    from trajalign.train.backtracking import Backtracking
    from trajalign.train.rerouting import Rerouting

    comparators = {"prefix-constrained": PrefixConstrained, "circuit-breaker": Rerouting,
                   "refusal-ablation": RefusalAblation, "backtracking": Backtracking,
                   "harmful-sft": HarmfulSFT, "benign-sft": BenignSFT}
    return comparators.get(recipe, Objective)()
