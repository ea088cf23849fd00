"""Fine-tuning on recipe rows with TRL's SFTTrainer: full or LoRA, seeded, resumable, accelerate-ready."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from trajalign.batching import pad_right
from trajalign.data.datasets import Behavior
from trajalign.data.trajectories import Trajectory, load_trajectories
from trajalign.errors import InputError
from trajalign.models.loading import ModelSpec
from trajalign.models.registry import DEFAULT_MODEL
from trajalign.requirements import require
from trajalign.runs import write_config
from trajalign.train.anchoring import anchoring_loss
from trajalign.train.anchors import Anchor, build_anchors
from trajalign.train.hf_trainer import no_activation_checkpointing, no_final_checkpoint
from trajalign.train.losses import ConstrainedSettings, constrained_loss, label_log_probs, trained_positions
from trajalign.train.objectives import objective_for
from trajalign.train.preference import PreferenceSettings, build_pairs, train_preference
from trajalign.train.recipes import BENIGN_KINDS, IGNORE, RecipeConfig, TrainingRow
from trajalign.train.sources import AnchorAnswers, AnchorSource, HarmfulSource, load_sources

DONE_MARKER = "trajalign-trained.json"


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(default=16, gt=0)
    alpha: int = Field(default=32, gt=0)
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    merge: bool = Field(default=True, description="merge the adapter into the weights when saving")


class TrainConfig(ModelSpec):
    """One fine-tuning run: a model, a recipe, harmful and benign prompts, and optimisation settings."""

    recipe: RecipeConfig = Field(default_factory=RecipeConfig)
    harmful: list[HarmfulSource] = Field(default=[HarmfulSource(name="advbench")],
                                         description="harmful sources ('name' or 'name:N'); trajectories of each "
                                         "come from the trajectory source")
    harmful_limit: int | None = Field(default=160, description="first N behaviors of each harmful source that "
                                      "sets no limit of its own")
    benign: list[AnchorSource] = Field(default=[AnchorSource(name="jbb-benign"),
                                                AnchorSource(name="self-instruct-seed")],
                                       description="benign anchor sources, each with its limit, weight and answers")
    benign_limit: int | None = Field(default=120, description="first N benign prompts of all sources together")
    anchor_answers: AnchorAnswers = Field(default="self", description="anchor answers of sources that set none: "
                                          "self (the original model's greedy answer) or reference (the dataset's)")
    trajectories: str = f"model:{DEFAULT_MODEL}"
    trajectory_tokens: int = Field(default=48, gt=0)
    anchor_tokens: int = Field(default=64, gt=0, description="anchor answers are cut to this many tokens")
    lora: LoraSettings | None = None
    constrained: ConstrainedSettings | None = None
    kl_weight: float = Field(default=0.0, ge=0, description="benign likelihood anchoring: weight of "
                             "KL(original || model) over the trained tokens of benign rows")
    preference: PreferenceSettings | None = Field(default=None, description="a DPO stage after SFT")
    rounds: int = Field(default=1, gt=0, description="on-policy rounds: attack, add the failures, train again")
    learning_rate: float = Field(default=5e-5, gt=0)
    epochs: float = Field(default=2.0, gt=0)
    max_steps: int | None = Field(default=None, gt=0, description="stop after this many optimizer steps (epochs "
                                  "repeat as needed); unset: the epochs decide")
    save_models_at: list[int] = Field(default=[], description="also save the model as it is after each of these "
                                      "optimizer steps, at out/step-N (the last step's model is out itself)")
    batch_size: int = Field(default=16, gt=0, description="rows per optimizer step")
    micro_batch_size: int = Field(default=2, gt=0, description="rows per forward pass: a step's rows go through in "
                                  "passes of this many, gradients summed: the same update with less memory and less "
                                  "padding (rows of similar length share a pass)")
    generation_batch_size: int = Field(default=64, gt=0, description="rows per pass when self-distilling anchors "
                                       "and generating trajectories: decoding is cheaper per token in wide batches")
    gradient_accumulation: int = Field(default=1, gt=0)
    freeze_embeddings: bool = Field(default=True, description="freeze (tied) embeddings: faster, keeps utility")
    save_steps: int = Field(default=50, gt=0, description="checkpoint interval, for resuming a killed run")
    seed: int = 0
    out: Path = Path("runs/train")

    @field_validator("harmful", mode="before")
    @classmethod
    def _one_or_more(cls, value):
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _micro_batches_fill_a_batch(self) -> "TrainConfig":
        if self.batch_size % min(self.micro_batch_size, self.batch_size):
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size "
                             f"{self.micro_batch_size}")
        return self


def collate(rows: list[dict], pad_id: int) -> dict:
    """Right-pad input_ids with the pad token and labels with the ignore index."""
    import torch

    input_ids, attention_mask = pad_right([row["input_ids"] for row in rows], pad_id)
    labels, _ = pad_right([row["labels"] for row in rows], IGNORE)
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if "benign" in rows[0]:  # benign likelihood anchoring needs to know which rows are benign
        batch["benign"] = torch.tensor([row["benign"] for row in rows], dtype=torch.bool)
    return batch


def _trainer_class():
    class TrajectoryTrainer(require("trl", "training").SFTTrainer):
        """SFTTrainer whose loss the recipe's objective chooses; the token loss has an optional token-wise
        constrained form and an optional KL term on benign rows, both against the frozen original."""

        def __init__(self, *args, objective, reference_model=None, constrained: ConstrainedSettings | None = None,
                     kl_weight: float = 0.0, **kwargs):
            super().__init__(*args, **kwargs)
            # Every loss here is its micro-batch's share of the step's loss (a token sum over the step's trained
            # tokens, a mean over micro-batches), so the trainer must not divide it again.
            self.loss_is_scaled_for_ga = True
            self.objective = objective
            self.reference_model = reference_model
            self.constrained = constrained
            self.kl_weight = kl_weight

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return self.objective.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

        def create_optimizer(self, model=None):
            """The default optimizer, with each parameter that the objective scales in a group of its own, at
            that multiple of the learning rate (the scheduler then decays every group alike)."""
            optimizer = super().create_optimizer(model)
            for parameter, scale in self.objective.learning_rate_scales(self.model if model is None else model):
                for group in optimizer.param_groups:
                    group["params"] = [kept for kept in group["params"] if kept is not parameter]
                optimizer.add_param_group({"params": [parameter], "weight_decay": 0.0,
                                           "lr": self.args.learning_rate * scale})
            return optimizer

        def token_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """Cross-entropy (or the constrained loss) from logits at trained positions only.

            TRL's default path computes per-token statistics over the whole vocabulary at every position, which
            on CPU costs more than the model itself; RTO labels ride in the same single forward pass.
            """
            import torch

            positions, targets = trained_positions(inputs["labels"])
            forward = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
                       "use_cache": False, "logits_to_keep": positions}
            outputs = model(**forward)
            log_probs, mask = label_log_probs(outputs.logits, targets)
            # Divided by the trained tokens of the whole step, so that micro-batches add up to the step's mean.
            count = num_items_in_batch if num_items_in_batch is not None else (
                mask.sum() * self.current_gradient_accumulation_steps)
            count = torch.as_tensor(count, device=log_probs.device).clamp(min=1)
            if self.constrained is None:
                loss = -log_probs.sum() / count
            else:
                with torch.no_grad():
                    reference, _ = label_log_probs(self.reference_model(**forward).logits, targets)
                loss = constrained_loss(log_probs, reference, mask, self.constrained, count)
            if self.kl_weight:  # benign likelihood anchoring (trajalign.train.anchoring)
                loss = loss + self.kl_weight * anchoring_loss(
                    self.accelerator.unwrap_model(model), self.reference_model, forward, outputs.logits, targets,
                    inputs["benign"]) / self.current_gradient_accumulation_steps
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients across ranks
            return (loss, outputs) if return_outputs else loss

    return TrajectoryTrainer


def load_harmful(config: TrainConfig) -> list[Behavior]:
    return load_sources(config.harmful, config.harmful_limit)


def load_benign(config: TrainConfig) -> list[Behavior]:
    behaviors = load_sources(config.benign)
    return behaviors[:config.benign_limit] if config.benign_limit else behaviors


@dataclass
class Materials:
    """What training rows and preference pairs are built from, all from the original model or the datasets:
    harmful (id, prompt, trajectory ids) and benign anchors."""

    harmful: list[tuple[str, str, list[int]]]
    anchors: list[Anchor]

    @property
    def benign(self) -> list[tuple[str, str, list[int], bool]]:
        return [anchor.as_tuple() for anchor in self.anchors]


def prepare_materials(config: TrainConfig, handle, harmful: list[Behavior], benign: list[Behavior],
                      cache_dir: Path, trajectories: dict[str, Trajectory] | None = None,
                      progress=None) -> Materials:
    """Trajectories of the harmful behaviors (those not given are generated or read, and cached) and anchor
    answers of the benign ones; `handle` must hold the original model. `progress(done, total, unit)` follows
    their generation."""
    if config.recipe.benign_ratio == 0 and config.preference is None:
        benign = []
    anchors = build_anchors(handle, benign, config.benign, config.anchor_answers, config.anchor_tokens,
                            config.generation_batch_size, cache_dir, progress)
    trajectories = dict(trajectories or {})
    missing = [behavior for behavior in harmful if behavior.id not in trajectories]
    if missing:
        trajectories.update(load_trajectories(config.trajectories, missing, handle, config.trajectory_tokens,
                                              config.generation_batch_size, cache_dir=cache_dir,
                                              progress=progress))
    return Materials([(b.id, b.prompt, trajectories[b.id].token_ids) for b in harmful], anchors)


def prepare_rows(config: TrainConfig, chat, materials: Materials, extra_rows: list[TrainingRow] = (),
                 objective=None) -> list[TrainingRow]:
    """The recipe's rows, plus `extra_rows` (failures found by attacking a trained model) shuffled in."""
    objective = objective or objective_for(config.recipe.name)
    rows = objective.build_rows(config.recipe, chat, materials.harmful, materials.benign,
                                [anchor.weight for anchor in materials.anchors])
    if extra_rows:
        rows = rows + list(extra_rows)
        random.Random(config.recipe.seed).shuffle(rows)
    return rows


def _last_checkpoint(directory: Path) -> str | None:
    """The newest complete checkpoint: trainer_state.json is written last, so a kill mid-save leaves none."""
    checkpoints = sorted((path for path in directory.glob("checkpoint-*") if (path / "trainer_state.json").exists()),
                         key=lambda path: int(path.name.split("-")[1]))
    return str(checkpoints[-1]) if checkpoints else None


def _step_log(out: Path, progress):
    """A trainer callback: each logged step becomes a readable line in `training.log` (appended as it comes, so a
    killed run keeps it) and advances `progress(step, steps, "steps", note)` with the current loss."""
    from transformers import TrainerCallback

    class StepLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            values = "  ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                               for key, value in logs.items() if key != "total_flos")
            with open(out / "training.log", "a", encoding="utf-8") as file:
                file.write(f"step {state.global_step}/{state.max_steps}  {values}\n")
            if progress and "loss" in logs:
                progress(state.global_step, state.max_steps, "steps", f"loss {logs['loss']:.3f}")

    return StepLog()


def run_training(config: TrainConfig, handle=None, harmful: list[Behavior] | None = None,
                 benign: list[Behavior] | None = None, trajectories: dict | None = None,
                 cache_dir: Path | None = None, extra_rows: list[TrainingRow] = (), progress=None) -> Path:
    """Train and save an HF model directory at `config.out`; a killed run resumes from its last checkpoint.

    `trajectories` and `cache_dir` let a caller share work already done (the reproduction does); `extra_rows`
    join the recipe's rows. With a preference stage, the SFT model is kept in `out/sft` and DPO's result is
    the model at `out`; with several rounds (trajalign.train.iteration), each round's model is `out/round-N` and
    the last one's directory is returned. `progress(done, total, unit, note)` follows the anchors' generation,
    then the steps with the current loss; the trainer's own printing is off, its log goes to `training.log` and
    `training_log.json` in the model's directory."""
    require("datasets", "training")
    require("trl", "training")
    require("matplotlib", "the training loss curve")
    if config.lora:
        require("peft", "LoRA training")
    if config.rounds > 1:
        from trajalign.train.iteration import run_rounds

        return run_rounds(config, handle, harmful, benign, trajectories, cache_dir)[-1]
    out = config.out
    objective = objective_for(config.recipe.name)
    config = objective.configure(config)
    if config.preference and config.lora and not config.lora.merge:
        raise InputError("preference: the DPO stage trains on the merged SFT model; set lora.merge to true")
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main:  # before the finished check: a model trained with other settings is refused, not reused
        write_config(out, config, added_fields_take_defaults=True)
    if (out / DONE_MARKER).exists():
        return out
    handle = handle or config.load_model()
    harmful = harmful if harmful is not None else load_harmful(config)
    benign = benign if benign is not None else load_benign(config)
    materials = prepare_materials(config, handle, harmful, benign, cache_dir or out / "cache", trajectories,
                                  progress)
    sft_out = out / "sft" if config.preference else out
    if not (sft_out / DONE_MARKER).exists():
        _fine_tune(config, handle, prepare_rows(config, handle.chat, materials, extra_rows, objective), sft_out,
                   is_main, objective, progress)
    if config.preference:
        _prefer(config, handle, materials, sft_out, is_main)
    return out


def _check_window(handle, items: list[tuple[str, str, int]]) -> None:
    """items: (behavior id, row kind, tokens); each must fit the model's window."""
    window = getattr(handle.config, "max_position_embeddings", None)
    too_long = next((item for item in items if window and item[2] > window), None)
    if too_long is not None:
        behavior_id, kind, length = too_long
        raise InputError(f"behavior '{behavior_id}': a {kind} training row of {length} tokens exceeds the model's "
                         f"window of {window}")


def _on_gpu(config: TrainConfig) -> bool:
    import torch

    return torch.cuda.is_available() and config.device != "cpu"


def _lora_config(config: TrainConfig, options: dict | None = None):
    """The config's LoRA settings, with `options` (a comparator's own, e.g. which layers) taking precedence."""
    from peft import LoraConfig

    settings = {"r": config.lora.r, "lora_alpha": config.lora.alpha, "lora_dropout": config.lora.dropout,
                "target_modules": config.lora.target_modules, "task_type": "CAUSAL_LM"}
    return LoraConfig(**{**settings, **(options or {})})


def _fine_tune(config: TrainConfig, handle, rows: list[TrainingRow], out: Path, is_main: bool, objective,
               progress=None) -> None:
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTConfig

    _check_window(handle, [(row.behavior_id, row.kind, len(row.input_ids)) for row in rows])
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "rows.jsonl", "w", encoding="utf-8") as handle_rows:
            handle_rows.writelines(row.model_dump_json() + "\n" for row in rows)
    columns = [{"input_ids": row.input_ids, "labels": row.labels, **objective.row_columns(row)} for row in rows]
    if config.kl_weight:
        columns = [{**column, "benign": row.kind in BENIGN_KINDS} for column, row in zip(columns, rows)]
    dataset = Dataset.from_list(columns)

    model = handle.model
    model.train()
    if config.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    objective.prepare_model(handle, config)
    # The frozen original: the constrained loss always keeps a copy; the KL term uses LoRA's disabled adapter
    # when there is one, a copy otherwise.
    needs_copy = config.constrained or (config.kl_weight and not config.lora)
    reference = copy.deepcopy(model).eval().requires_grad_(False) if needs_copy else None
    if config.lora:
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config(config, objective.lora_options(model)))
    on_gpu = _on_gpu(config)
    micro_batch = min(config.micro_batch_size, config.batch_size)
    args = SFTConfig(
        output_dir=str(out / "checkpoints"), num_train_epochs=config.epochs,
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=config.gradient_accumulation * config.batch_size // micro_batch,
        max_steps=config.max_steps or -1, learning_rate=config.learning_rate, lr_scheduler_type="linear",
        warmup_steps=0, weight_decay=0.0,
        logging_steps=1, save_strategy="steps", save_steps=config.save_steps, save_total_limit=1,
        report_to=[], seed=config.seed, data_seed=config.seed, use_cpu=not on_gpu,
        bf16=on_gpu and config.dtype == "bfloat16",
        dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False, max_length=None,
        dataloader_num_workers=0, disable_tqdm=True, ddp_find_unused_parameters=False,
        train_sampling_strategy="group_by_length" if objective.length_grouped_batches else "random",
        **no_activation_checkpointing(SFTConfig),
    )
    pad_id = handle.tokenizer.pad_token_id
    trainer = _trainer_class()(
        model=model, args=args, train_dataset=dataset, processing_class=handle.tokenizer,
        data_collator=lambda batch: {**collate(batch, pad_id), **objective.batch_columns(batch)},
        callbacks=objective.callbacks(out / "checkpoints") + _snapshots(config, handle, out) + [no_final_checkpoint()],
        objective=objective, reference_model=reference,
        constrained=config.constrained, kl_weight=config.kl_weight,
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log dict on stdout
    trainer.add_callback(_step_log(out, progress))
    trainer.train(resume_from_checkpoint=_last_checkpoint(out / "checkpoints"))
    if trainer.is_world_process_zero():
        _finish(trainer, handle, config, out, {"rows": len(rows)})


def model_at_step(out: Path, step: int, last_step: int) -> Path:
    """Where `save_models_at` keeps the model after `step` optimizer steps of a run whose last step is
    `last_step` (that one is the run's own model)."""
    return Path(out) if step == last_step else Path(out) / f"step-{step}"


def _snapshots(config: TrainConfig, handle, out: Path) -> list:
    """A callback saving the model after each step in `save_models_at`, written whole and renamed (a killed run
    never leaves half a model; a resumed one saves those it had not reached)."""
    if not config.save_models_at:
        return []
    from transformers import TrainerCallback

    class Snapshots(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            step = state.global_step
            target = model_at_step(out, step, state.max_steps)
            if step not in config.save_models_at or target == out or not state.is_world_process_zero \
                    or (target / DONE_MARKER).exists():
                return
            partial = target.with_name(f"{target.name}.partial")
            shutil.rmtree(partial, ignore_errors=True)
            _save(copy.deepcopy(model) if config.lora else model, handle, config, partial)
            (partial / DONE_MARKER).write_text(json.dumps({"steps": step}))
            shutil.rmtree(target, ignore_errors=True)
            os.replace(partial, target)

    return [Snapshots()]


def _prefer(config: TrainConfig, handle, materials: Materials, sft_out: Path, is_main: bool) -> None:
    """DPO on the SFT model at `sft_out`, the SFT model itself the reference; the result is saved at config.out."""
    out = config.out
    pairs = build_pairs(config.preference, config.recipe, handle.chat, materials.harmful, materials.benign)
    _check_window(handle, [(pair.behavior_id, pair.kind, len(pair.prompt_ids) + max(len(pair.chosen_ids),
                                                                                      len(pair.rejected_ids)))
                           for pair in pairs])
    if is_main:
        with open(out / "pairs.jsonl", "w", encoding="utf-8") as handle_pairs:
            handle_pairs.writelines(pair.model_dump_json() + "\n" for pair in pairs)
    sft = config.model_copy(update={"model": str(sft_out)}).load_model()
    model = sft.model
    model.train()
    if config.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    on_gpu = _on_gpu(config)
    trainer = train_preference(config.preference, model, sft.tokenizer, pairs, out / "checkpoints",
                               batch_size=config.batch_size, seed=config.seed, on_gpu=on_gpu,
                               bf16=on_gpu and config.dtype == "bfloat16",
                               lora_config=_lora_config(config) if config.lora else None,
                               resume_from=_last_checkpoint(out / "checkpoints"), save_steps=config.save_steps,
                               is_main=is_main)
    if trainer.is_world_process_zero():
        _finish(trainer, handle, config, out, {"pairs": len(pairs)})


def _finish(trainer, handle, config: TrainConfig, out: Path, counts: dict) -> None:
    _save(trainer.model, handle, config, out)
    _write_log(trainer.state.log_history, out)
    (out / DONE_MARKER).write_text(json.dumps({**counts, "steps": trainer.state.global_step}))
    # Only a killed run needs a resume point; the optimizer state makes a checkpoint ~2.5x the model.
    shutil.rmtree(out / "checkpoints", ignore_errors=True)


def _save(model, handle, config: TrainConfig, out: Path) -> None:
    if config.lora and config.lora.merge:
        model = model.merge_and_unload()
    elif config.lora:
        model.peft_config["default"].base_model_name_or_path = config.model
    model.save_pretrained(out, safe_serialization=True)
    handle.tokenizer.save_pretrained(out)


def _write_log(history: list[dict], out: Path) -> None:
    (out / "training_log.json").write_text(json.dumps(history, indent=1))
    losses = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]
    require("matplotlib", "the training loss curve").use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3))
    axis.plot([step for step, _ in losses], [loss for _, loss in losses], color="#0072B2")
    axis.set_xlabel("step")
    axis.set_ylabel("training loss")
    figure.tight_layout()
    figure.savefig(out / "loss_curve.png", dpi=120)
    plt.close(figure)
