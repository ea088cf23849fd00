"""A preference stage after SFT: DPO (TRL's DPOTrainer) on pairs built from the study's own trajectories.

Harmful perturbed contexts (a harmful prefix of k tokens, or an insertion) prefer a recovery to the trajectory's
harmful continuation; benign prompts prefer their compliant answer to a refusal. Pairs are token ids end to end.
"""

from __future__ import annotations

import random

from pydantic import BaseModel, ConfigDict, Field

from trajalign.train.hf_trainer import no_activation_checkpointing, no_final_checkpoint
from trajalign.train.recipes import MAX_OWN_TOKENS, RecipeConfig, RowBuilder

PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


class PreferenceSettings(BaseModel):
    """DPO after SFT, on the SFT model, with the SFT model as the reference."""

    model_config = ConfigDict(extra="forbid")
    beta: float = Field(default=0.1, gt=0, description="DPO's beta: how far the policy may move from the reference")
    epochs: float = Field(default=1.0, gt=0)
    learning_rate: float = Field(default=1e-5, gt=0)
    pairs_per_behavior: int = Field(default=1, gt=0, description="pairs drawn for each harmful and benign behavior")
    insertion_share: float = Field(default=0.5, ge=0, le=1,
                                   description="share of harmful pairs whose context is an insertion, not a prefix")
    micro_batch_size: int = Field(default=4, gt=0, description="pairs per forward pass; gradients accumulate to the "
                                  "training batch size. A pass holds chosen and rejected log-probabilities over the "
                                  "whole vocabulary: 16 pairs took 10.8 GB on the embedded model, 4 far less")


class PreferencePair(BaseModel):
    prompt_ids: list[int] = Field(description="the whole context: chat prompt plus any injected assistant tokens")
    chosen_ids: list[int]
    rejected_ids: list[int]
    kind: str
    behavior_id: str


def harmful_pair(builder: RowBuilder, recipe: RecipeConfig, rng: random.Random, behavior_id: str,
                 prompt: list[int], trajectory: list[int], insertion: bool) -> PreferencePair:
    """A perturbed harmful context; chosen: a recovery, rejected: what the trajectory says next.

    k, j and the span length are drawn as for the SFT rows; the harmful continuation is never empty.
    """
    chosen = rng.choice(builder.recoveries) + builder.end
    if insertion:
        length = rng.randint(1, min(recipe.max_span, len(trajectory) - 1))
        start = rng.randint(0, len(trajectory) - length - 1)
        own = rng.choice(builder.refusals)[:rng.randint(1, MAX_OWN_TOKENS)]
        return PreferencePair(prompt_ids=prompt + own + trajectory[start:start + length], chosen_ids=chosen,
                              rejected_ids=trajectory[start + length:], kind="harmful-insertion",
                              behavior_id=behavior_id)
    k = rng.randint(1, min(recipe.max_prefix, len(trajectory) - 1))
    return PreferencePair(prompt_ids=prompt + trajectory[:k], chosen_ids=chosen, rejected_ids=trajectory[k:],
                          kind="harmful-prefix", behavior_id=behavior_id)


def build_pairs(settings: PreferenceSettings, recipe: RecipeConfig, chat,
                harmful: list[tuple[str, str, list[int]]],
                benign: list[tuple[str, str, list[int], bool]]) -> list[PreferencePair]:
    """harmful: (id, prompt, trajectory ids); benign: (id, prompt, compliant answer ids, answer finished).

    Trajectories shorter than two tokens leave no harmful continuation after a perturbation and give no pair.
    """
    rng = random.Random(recipe.seed)
    builder = RowBuilder(chat)
    pairs = []
    for behavior_id, prompt, trajectory in harmful:
        if len(trajectory) < 2:
            continue
        prompt_ids = chat.prompt_ids(prompt)
        pairs += [harmful_pair(builder, recipe, rng, behavior_id, prompt_ids, trajectory,
                               rng.random() < settings.insertion_share) for _ in range(settings.pairs_per_behavior)]
    for behavior_id, prompt, answer, finished in benign:
        prompt_ids = chat.prompt_ids(prompt)
        pairs += [PreferencePair(prompt_ids=prompt_ids, chosen_ids=answer + (builder.end if finished else []),
                                 rejected_ids=rng.choice(builder.refusals) + builder.end, kind="benign",
                                 behavior_id=behavior_id) for _ in range(settings.pairs_per_behavior)]
    rng.shuffle(pairs)
    return pairs


def _trainer_class():
    from trl import DPOTrainer

    class TokenPairTrainer(DPOTrainer):
        """DPOTrainer on pairs that are already token ids.

        TRL 1.16 always re-tokenizes text datasets (it needs `prompt`/`chosen`/`rejected` strings and finds the
        completion where the two tokenizations diverge), which would decode-then-re-encode injected tokens and
        could move the prompt/completion boundary. Its collator takes `prompt_ids`/`chosen_ids`/`rejected_ids`
        directly, so the preparation step passes such a dataset through untouched.
        """

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            missing = set(PAIR_COLUMNS) - set(dataset.column_names)
            if missing:
                raise ValueError(f"preference pairs need token-id columns; missing {sorted(missing)}")
            return dataset.select_columns(list(PAIR_COLUMNS))

    return TokenPairTrainer


def train_preference(settings: PreferenceSettings, model, tokenizer, pairs: list[PreferencePair], output_dir,
                     batch_size: int, seed: int, on_gpu: bool, bf16: bool, lora_config=None,
                     resume_from: str | None = None, save_steps: int = 50, is_main: bool = True):
    """Run DPO on `model` (the SFT model) with a frozen copy of it as the reference (with LoRA: the model with
    its adapter disabled); returns the trainer, whose `model` holds the result."""
    import copy

    from datasets import Dataset
    from trl import DPOConfig

    reference = None if lora_config else copy.deepcopy(model).eval().requires_grad_(False)
    micro_batch = min(settings.micro_batch_size, batch_size)
    args = DPOConfig(
        output_dir=str(output_dir), beta=settings.beta, num_train_epochs=settings.epochs,
        learning_rate=settings.learning_rate, per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=max(1, batch_size // micro_batch), lr_scheduler_type="linear",
        warmup_steps=0, weight_decay=0.0, logging_steps=1, save_strategy="steps", save_steps=save_steps,
        save_total_limit=1, report_to=[], seed=seed, data_seed=seed, use_cpu=not on_gpu, bf16=bf16,
        max_length=None, dataloader_num_workers=0, disable_tqdm=not is_main, ddp_find_unused_parameters=False,
        **no_activation_checkpointing(DPOConfig),
    )
    dataset = Dataset.from_list([pair.model_dump(include=set(PAIR_COLUMNS)) for pair in pairs])
    trainer = _trainer_class()(model=model, ref_model=reference, args=args, train_dataset=dataset,
                               processing_class=tokenizer, peft_config=lora_config, callbacks=[no_final_checkpoint()])
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer
