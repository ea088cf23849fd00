"""Fine-tuning on recipe rows with TRL's SFTTrainer: full or LoRA, seeded, resumable, accelerate-ready."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from trajalign.data.datasets import BUNDLED, Behavior, load_behaviors
from trajalign.data.trajectories import generate_answers, load_trajectories
from trajalign.errors import InputError
from trajalign.models.registry import DEFAULT_MODEL
from trajalign.requirements import require
from trajalign.runs import write_config
from trajalign.train.losses import ConstrainedSettings, constrained_loss, label_log_probs, trained_positions
from trajalign.train.recipes import IGNORE, RecipeConfig, TrainingRow, build_rows

DONE_MARKER = "trajalign-trained.json"


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(default=16, gt=0)
    alpha: int = Field(default=32, gt=0)
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    merge: bool = Field(default=True, description="merge the adapter into the weights when saving")


class TrainConfig(BaseModel):
    """One fine-tuning run: a model, a recipe, harmful and benign prompts, and optimisation settings."""

    model_config = ConfigDict(extra="forbid")
    model: str = DEFAULT_MODEL
    recipe: RecipeConfig = Field(default_factory=RecipeConfig)
    harmful: str = "advbench"
    harmful_limit: int | None = 160
    benign: list[str] = Field(default=["jbb-benign", "self-instruct-seed"])
    benign_limit: int | None = 120
    trajectories: str = f"model:{DEFAULT_MODEL}"
    trajectory_tokens: int = Field(default=48, gt=0)
    anchor_tokens: int = Field(default=64, gt=0, description="length of self-distilled benign answers")
    lora: LoraSettings | None = None
    constrained: ConstrainedSettings | None = None
    learning_rate: float = Field(default=5e-5, gt=0)
    epochs: float = Field(default=2.0, gt=0)
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
    dtype: str = "float32"
    device: str = "auto"
    trust_remote_code: bool = Field(default=False, description="run the model repository's own code")
    allow_pickle: bool = Field(default=False, description="accept pickle weights, which can run code")
    out: Path = Path("runs/train")

    @model_validator(mode="after")
    def _micro_batches_fill_a_batch(self) -> "TrainConfig":
        if self.batch_size % min(self.micro_batch_size, self.batch_size):
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size "
                             f"{self.micro_batch_size}")
        return self


def collate(rows: list[dict], pad_id: int) -> dict:
    """Right-pad input_ids with the pad token and labels with the ignore index."""
    import torch

    width = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        length = len(row["input_ids"])
        input_ids[index, :length] = torch.tensor(row["input_ids"])
        labels[index, :length] = torch.tensor(row["labels"])
        attention_mask[index, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def _trainer_class():
    class TrajectoryTrainer(require("trl", "training").SFTTrainer):
        """SFTTrainer with an optional token-wise constrained objective against a frozen reference."""

        def __init__(self, *args, reference_model=None, constrained: ConstrainedSettings | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.reference_model = reference_model
            self.constrained = constrained

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
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
            count = num_items_in_batch if num_items_in_batch is not None else mask.sum()
            count = torch.as_tensor(count, device=log_probs.device).clamp(min=1)
            if self.constrained is None:
                loss = -log_probs.sum() / count
            else:
                with torch.no_grad():
                    reference, _ = label_log_probs(self.reference_model(**forward).logits, targets)
                loss = constrained_loss(log_probs, reference, mask, self.constrained, count)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients across ranks
            return (loss, outputs) if return_outputs else loss

    return TrajectoryTrainer


def load_benign(names: list[str], limit: int | None) -> list[Behavior]:
    behaviors = []
    for name in names:
        if name in BUNDLED and not BUNDLED[name].training_allowed:
            raise InputError(f"dataset '{name}': its authors ask that it be used for evaluation only, not training")
        behaviors += load_behaviors(name)
    return behaviors[:limit] if limit else behaviors


def prepare_rows(config: TrainConfig, handle, harmful: list[Behavior], benign: list[Behavior],
                 cache_dir: Path, trajectories: dict | None = None, progress=None) -> list[TrainingRow]:
    trajectories = trajectories or load_trajectories(config.trajectories, harmful, handle, config.trajectory_tokens,
                                                     config.generation_batch_size, cache_dir=cache_dir,
                                                     progress=progress)
    if config.recipe.benign_ratio == 0:
        benign = []
    anchors = generate_answers(handle, benign, config.anchor_tokens, config.generation_batch_size,
                               cache_dir=cache_dir, progress=progress)
    return build_rows(
        config.recipe, handle.chat,
        [(b.id, b.prompt, trajectories[b.id].token_ids) for b in harmful],
        [(b.id, b.prompt, anchors[b.id], len(anchors[b.id]) < config.anchor_tokens) for b in benign],
    )


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
                 cache_dir: Path | None = None, progress=None) -> Path:
    """Train and save an HF model directory at `config.out`; a killed run resumes from its last checkpoint.

    `trajectories` and `cache_dir` let a caller share work already done (the reproduction does). `progress(done,
    total, unit, note)` follows the anchors' generation, then the steps with the current loss; the trainer's own
    printing is off, its log goes to `training.log` and `training_log.json` in `config.out`."""
    import torch
    from transformers import PrinterCallback

    Dataset = require("datasets", "training").Dataset
    SFTConfig = require("trl", "training").SFTConfig
    require("matplotlib", "the training loss curve")
    if config.lora:
        require("peft", "LoRA training")
    out = config.out
    if (out / DONE_MARKER).exists():
        return out
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main:
        write_config(out, config)
    if handle is None:
        from trajalign.models.loading import load_model

        handle = load_model(config.model, dtype=config.dtype, device=config.device,
                            trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle)
    harmful = harmful if harmful is not None else load_behaviors(config.harmful, limit=config.harmful_limit)
    benign = benign if benign is not None else load_benign(config.benign, config.benign_limit)
    rows = prepare_rows(config, handle, harmful, benign, cache_dir or out / "cache", trajectories, progress)
    window = getattr(handle.model.config, "max_position_embeddings", None)
    too_long = next((row for row in rows if window and len(row.input_ids) > window), None)
    if too_long is not None:
        raise InputError(f"behavior '{too_long.behavior_id}': a {too_long.kind} training row of "
                         f"{len(too_long.input_ids)} tokens exceeds the model's window of {window}")
    if is_main:
        with open(out / "rows.jsonl", "w", encoding="utf-8") as handle_rows:
            handle_rows.writelines(row.model_dump_json() + "\n" for row in rows)
    dataset = Dataset.from_list([{"input_ids": row.input_ids, "labels": row.labels} for row in rows])

    model = handle.model
    model.train()
    reference = copy.deepcopy(model).eval().requires_grad_(False) if config.constrained else None
    if config.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    if config.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha,
                                                 lora_dropout=config.lora.dropout,
                                                 target_modules=config.lora.target_modules, task_type="CAUSAL_LM"))
    on_gpu = torch.cuda.is_available() and config.device != "cpu"
    micro_batch = min(config.micro_batch_size, config.batch_size)
    args = SFTConfig(
        output_dir=str(out / "checkpoints"), num_train_epochs=config.epochs,
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=config.gradient_accumulation * config.batch_size // micro_batch,
        learning_rate=config.learning_rate, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        logging_steps=1, save_strategy="steps", save_steps=config.save_steps, save_total_limit=1,
        report_to=[], seed=config.seed, data_seed=config.seed, use_cpu=not on_gpu,
        bf16=on_gpu and config.dtype == "bfloat16",
        dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False, max_length=None,
        dataloader_num_workers=0, disable_tqdm=True, ddp_find_unused_parameters=False,
        train_sampling_strategy="group_by_length",  # similar lengths per batch: less compute spent on padding
        activation_checkpointing=False,  # TRL turns it on; for small models recomputation only costs time
    )
    pad_id = handle.tokenizer.pad_token_id
    trainer = _trainer_class()(
        model=model, args=args, train_dataset=dataset, processing_class=handle.tokenizer,
        data_collator=lambda batch: collate(batch, pad_id), reference_model=reference, constrained=config.constrained,
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log dict on stdout
    trainer.add_callback(_step_log(out, progress))
    trainer.train(resume_from_checkpoint=_last_checkpoint(out / "checkpoints"))
    if trainer.is_world_process_zero():
        _save(trainer.model, handle, config, out)
        _write_log(trainer.state.log_history, out)
        (out / DONE_MARKER).write_text(json.dumps({"rows": len(rows), "steps": trainer.state.global_step}))
        # Only a killed run needs a resume point; the optimizer state makes a checkpoint ~2.5x the model.
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return out


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
