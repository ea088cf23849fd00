"""Backtracking with a reset token (Zhang et al. 2024): the model learns to emit [RESET] mid-answer and start over.

Training rows: harmful prompt + a prefix of the model's own harmful trajectory (context, no loss) + reset + a
refusal (trained), some with the reset right at the start of the answer; benign anchors as in every recipe.

Evaluation (`trajalign.reset_token`, applied by every evaluation of a model whose tokenizer has the token): what
precedes the last reset is hidden from the user, a reset within the judge window counts as a refusal (a recovery on
harmful contexts; on benign prompts a false reset, the method's over-refusal), and the judges read the
continuation after its last reset, so a model that resets and then complies is still caught. A logit bias on the
reset token tunes false resets against recoveries: `EvalConfig.reset_logit_bias` (`trajalign eval
--reset-logit-bias`), added to the reset token's logit at every step by the hf backend and sent as `logit_bias` to
an OpenAI-compatible server.
"""

from __future__ import annotations

from trajalign.errors import InputError
from trajalign.train.objectives import Objective
from trajalign.train.recipes import RecipeConfig, RowBuilder, TrainingRow, build_rows


def add_reset_token(tokenizer, token: str) -> int:
    """Add `token` as a special token (kept whole, never split or merged) and return its id."""
    if token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"extra_special_tokens": [token]}, replace_extra_special_tokens=False)
    return tokenizer.convert_tokens_to_ids(token)


def backtracking_row(builder: RowBuilder, reset_id: int, prompt: list[int], harmful_prefix: list[int], rng,
                     behavior_id: str) -> TrainingRow:
    """Prompt + harmful prefix (context) + reset + refusal + end of turn (trained). The refusal opens the visible
    answer, so it is the template without a leading space."""
    trained = [reset_id] + rng.choice(builder.refusals) + builder.end
    return builder.row([(prompt, False), (harmful_prefix, False), (trained, True)], "backtrack", behavior_id)


class Backtracking(Objective):
    """`backtracking`: reset rows on harmful prompts; the reset token's embedding row learns, the others stay as
    they are when embeddings are frozen (full fine-tuning: a gradient mask; LoRA: PEFT's trainable tokens)."""

    def configure(self, config):
        if config.lora is not None and not config.lora.merge:
            raise InputError("recipe 'backtracking' with lora.merge false: the reset token changes the vocabulary, "
                             "which an unmerged adapter over the base model cannot load; keep merge true")
        return config

    def build_rows(self, recipe: RecipeConfig, chat, harmful, benign, weights=None) -> list[TrainingRow]:
        self.reset_id = add_reset_token(chat.tokenizer, recipe.backtracking.token)

        def harmful_row(builder, rng, behavior_id, prompt, trajectory):
            k = 0
            if trajectory and rng.random() < recipe.prefix_probability:
                k = rng.randint(1, min(recipe.max_prefix, len(trajectory)))
            return backtracking_row(builder, self.reset_id, prompt, trajectory[:k], rng, behavior_id)

        return build_rows(recipe, chat, harmful, benign, weights, harmful_row=harmful_row)

    def prepare_model(self, handle, config) -> None:
        """Room for the reset token (mean-initialised by transformers), and its row alone trainable when the
        embeddings are frozen for full fine-tuning; tied LM heads share the row, so it learns to emit the token too."""
        model = handle.model
        self.scaled_rows = []
        if model.get_input_embeddings().num_embeddings <= self.reset_id:
            model.resize_token_embeddings(len(handle.tokenizer))
        weight = model.get_input_embeddings().weight
        if config.freeze_embeddings and config.lora is None:
            import torch

            only_reset = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
            only_reset[self.reset_id] = 1
            weight.requires_grad_(True)
            weight.register_hook(lambda gradient: gradient * only_reset)
            self.scaled_rows = [(weight, config.recipe.backtracking.token_learning_rate_scale)]

    def learning_rate_scales(self, model) -> list[tuple]:
        """The embedding matrix, whose only non-zero gradient is the reset row's: Adam leaves rows without a
        gradient where they are, so the scale is the reset row's alone."""
        return [(weight, scale) for weight, scale in self.scaled_rows if scale != 1.0]

    def lora_options(self, model) -> dict:
        return {"trainable_token_indices": [self.reset_id]}
