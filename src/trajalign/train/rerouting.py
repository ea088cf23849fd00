"""Circuit breakers by representation rerouting (Zou et al. 2024): a LoRA adapter trained against the frozen original.

On harmful rows (prompt + the model's own harmful continuation) the adapted model's residual stream at two middle
blocks is pushed away from the original's: mean over continuation tokens of ReLU(cosine(h_adapted, h_original)).
On benign rows it is held in place: mean over tokens of the L2 distance between the two, at every block the adapter
touches. The original is the same model with its adapter disabled, run without gradients: no second copy.

In float32 the adapter starts exactly at the original, where the cosine is at its maximum and has zero gradient,
while the retain distance has a gradient of unit size as soon as the states move: on the embedded model, at the
paper's schedule, the retain term held the adapter there for all 56 steps of the compare preset (greedy answers
identical to the original's). `rerouting.rerouting_only` trains the first share of steps on rerouting alone.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from trajalign.errors import InputError
from trajalign.probe.hooks import capture_block_outputs, decoder_blocks, unwrap
from trajalign.train.objectives import Objective
from trajalign.train.recipes import IGNORE, RecipeConfig, RowBuilder, TrainingRow, build_rows
from trajalign.train.trainer import LoraSettings

# The reference implementation's LoRA (r 16, alpha 16, dropout 0.05 on every linear layer of the blocks it adapts).
PAPER_LORA = LoraSettings(r=16, alpha=16, dropout=0.05)
# It reroutes hidden states 10 and 20 of Llama-3-8B's 32 layers, the outputs of blocks 9 and 19.
PAPER_DEPTH, PAPER_REROUTED_OUTPUTS = 32, (10, 20)


def rerouting_row(builder: RowBuilder, rng, behavior_id: str, prompt: list[int], trajectory: list[int]) -> TrainingRow:
    """Prompt + harmful trajectory; the labels mark the trajectory tokens, whose states are rerouted (no
    cross-entropy is trained on them)."""
    return builder.row([(prompt, False), (trajectory, True)], "reroute", behavior_id)


def default_layers(depth: int) -> list[int]:
    """The blocks whose outputs the paper reroutes, scaled from its 32 layers to `depth`."""
    return sorted({max(0, round(depth * output / PAPER_DEPTH) - 1) for output in PAPER_REROUTED_OUTPUTS})


def schedule(step: int, total_steps: int, alpha: float, rerouting_only: float = 0.0) -> tuple[float, float]:
    """(rerouting weight, retain weight) at optimizer step `step` of `total_steps`: a(1 - t/2T) and a t/2T, the
    retain weight 0 over the first `rerouting_only` share of the steps."""
    progress = step / (2 * max(total_steps, 1))
    retain = 0.0 if step < rerouting_only * total_steps else alpha * progress
    return alpha * (1 - progress), retain


def rerouting_loss(adapted: torch.Tensor, original: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ReLU(cosine(adapted, original)) over layers and the [batch, seq] positions where `mask` holds;
    states are [layers, batch, seq, hidden]."""
    cosine = F.cosine_similarity(adapted.float(), original.float(), dim=-1)
    return _masked_mean(F.relu(cosine), mask)


def retain_loss(adapted: torch.Tensor, original: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the L2 distance between adapted and original states over layers and masked positions."""
    return _masked_mean((adapted.float() - original.float()).norm(dim=-1), mask)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(values.dtype).expand_as(values)
    return (values * weights).sum() / weights.sum().clamp(min=1)


@contextmanager
def _blocks_up_to(model, depth: int):
    """Run only the first `depth` decoder blocks: nothing above the deepest rerouted block enters the loss. Models
    whose forward slices its blocks by config.num_hidden_layers (Llama, Qwen, Mistral, Gemma) skip the rest;
    any other runs them all, to the same loss."""
    config = unwrap(model).config
    full = config.num_hidden_layers
    config.num_hidden_layers = depth
    try:
        yield
    finally:
        config.num_hidden_layers = full


class Rerouting(Objective):
    """`circuit-breaker`: rerouting loss on harmful rows, retain loss on benign anchors, LoRA on the blocks up to
    the deepest rerouted one (the paper's r=16 adapter unless the config names another)."""

    columns = ("rerouted",)
    # The reference pairs a harmful and a retained example in every step. Rows grouped by length fall into
    # batches of one kind (harmful continuations are longer than anchors), and Adam then alternates between a
    # rerouting step and a retain step, the latter pulling the adapter back to the original.
    length_grouped_batches = False

    def configure(self, config):
        # Its losses are means over the rerouted and the retained tokens of the batch, which micro-batches would
        # turn into a mean of per-pass means: a step's rows go through in one pass.
        update = {"micro_batch_size": config.batch_size}
        if config.lora is None:
            update["lora"] = PAPER_LORA
        return config.model_copy(update=update)

    def build_rows(self, recipe: RecipeConfig, chat, harmful, benign, weights=None) -> list[TrainingRow]:
        return build_rows(recipe, chat, harmful, benign, weights, harmful_row=rerouting_row)

    def row_columns(self, row: TrainingRow) -> dict[str, int]:
        return {"rerouted": int(row.kind == "reroute")}

    def prepare_model(self, handle, config) -> None:
        depth = len(decoder_blocks(handle.model))
        layers = config.recipe.rerouting.layers or default_layers(depth)
        outside = [layer for layer in layers if not 0 <= layer < depth]
        if outside:
            raise InputError(f"recipe.rerouting.layers: block {outside[0]} is outside the model's {depth} decoder "
                             f"blocks (numbered from 0)")
        self.rerouted = sorted(set(layers))
        self.adapted = list(range(self.rerouted[-1] + 1))
        self.alpha = config.recipe.rerouting.alpha
        self.rerouting_only = config.recipe.rerouting.rerouting_only
        self.lora_targets = config.lora.target_modules

    def lora_options(self, model) -> dict:
        """The config's LoRA on blocks 0..deepest rerouted only. PEFT restricts layers only for a list of module
        names, so "all-linear" becomes the names of the linear layers inside the blocks."""
        targets = self.lora_targets
        if targets == "all-linear":
            targets = sorted({name.split(".")[-1] for block in decoder_blocks(model)
                              for name, module in block.named_modules() if isinstance(module, torch.nn.Linear)})
        elif isinstance(targets, str):
            raise InputError("lora.target_modules: recipe 'circuit-breaker' takes 'all-linear' or a list of module "
                             "names, since its adapter covers only the blocks up to the deepest rerouted one")
        return {"target_modules": targets, "layers_to_transform": self.adapted}

    def block_states(self, model, peft_model, inputs) -> torch.Tensor:
        """Outputs of the adapted blocks, [blocks, batch, seq, hidden]: only the LM head's last position is paid."""
        forward = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "use_cache": False,
                   "logits_to_keep": 1}
        with capture_block_outputs(peft_model, self.adapted) as captured, _blocks_up_to(peft_model, len(self.adapted)):
            model(**forward)
        return torch.stack([captured[layer] for layer in self.adapted])

    def compute_loss(self, trainer, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        peft_model = trainer.accelerator.unwrap_model(model)
        with torch.no_grad(), peft_model.disable_adapter():
            original = self.block_states(model, peft_model, inputs)
        adapted = self.block_states(model, peft_model, inputs)
        rerouted_rows = inputs["rerouted"].bool()[:, None]
        continuation = (inputs["labels"] != IGNORE) & rerouted_rows
        retained = inputs["attention_mask"].bool() & ~rerouted_rows
        rerouting_weight, retain_weight = schedule(trainer.state.global_step, trainer.state.max_steps, self.alpha,
                                                     self.rerouting_only)
        loss = (rerouting_weight * rerouting_loss(adapted[self.rerouted], original[self.rerouted], continuation)
                + retain_weight * retain_loss(adapted, original, retained))
        loss = loss / trainer.current_gradient_accumulation_steps  # a pass's share of the step's mean
        return (loss, None) if return_outputs else loss
