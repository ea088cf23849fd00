"""Fine-tuning durability (Qi et al. 2024): k steps of harmful or benign SFT on the attacked model, then the prefill
depth sweep on each fine-tuned model.

One training run to the largest k keeps the model after every smaller k (`save_models_at`), under the run
directory (`finetune/<data>`), so a resumed or repeated evaluation trains nothing again. Harmful SFT trains on the
original model's own harmful trajectories of training behaviors, never on the evaluated ones; benign SFT on
instruction questions with their human answers (Dolly's training part). Each planned episode names the model
that runs it, and the evaluation generates it there.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from trajalign.attacks.base import BaseAttack, BasePosition, PlannedEpisode, PlanningContext, sorted_counts
from trajalign.attacks.prefill import Prefill
from trajalign.data.datasets import Behavior
from trajalign.data.trajectories import Trajectory, load_trajectories
from trajalign.errors import InputError
from trajalign.models.registry import DEFAULT_MODEL

DEFAULT_TRAINING_SETS = {"harmful": "catqa", "benign": "dolly-train"}


class FinetunePosition(BasePosition):
    kind: Literal["finetune"] = "finetune"
    steps: int
    depth: int
    label_format = "steps={steps},depth={depth}"


class Finetune(BaseAttack):
    """k steps of harmful or benign SFT, then the prefill sweep at every depth, for each k."""

    kind: Literal["finetune"] = "finetune"
    data: Literal["harmful", "benign"] = Field(default="harmful", description="harmful SFT (prompt + harmful "
                                               "trajectory) or benign instruction SFT (prompt + human answer)")
    steps: list[int] = Field(default=[5, 20, 50], description="optimizer steps of fine-tuning (k)")
    depths: list[int] = Field(default=[0, 5, 10, 20, 40], description="prefill depths swept on each model")
    train_dataset: str | None = Field(default=None, description="training prompts (harmful: training behaviors, "
                                      "never evaluated ones; default catqa; benign: default dolly-train)")
    train_limit: int | None = Field(default=160, gt=0, description="first N training prompts")
    train_trajectories: str = Field(default=f"model:{DEFAULT_MODEL}", description="harmful SFT targets: the "
                                    "original model's own answers")
    train_tokens: int = Field(default=48, gt=0, description="length of the trained answers")
    learning_rate: float = Field(default=5e-5, gt=0)
    batch_size: int = Field(default=8, gt=0)
    seed: int = 0
    position_type = FinetunePosition

    @field_validator("steps", "depths")
    @classmethod
    def _sorted(cls, values: list[int]) -> list[int]:
        return sorted_counts(values)

    @field_validator("steps")
    @classmethod
    def _positive(cls, values: list[int]) -> list[int]:
        if 0 in values:
            raise ValueError("steps must be > 0 (the untouched model is the plain prefill attack)")
        return values

    def needs_trajectories(self) -> bool:
        return max(self.depths) > 0

    def grid(self, behavior: Behavior) -> list[FinetunePosition]:
        return [FinetunePosition(steps=steps, depth=depth) for steps in self.steps for depth in self.depths]

    def tokens_needed(self, position: FinetunePosition) -> int:
        return position.depth

    def headline(self, position: FinetunePosition) -> str:
        return f"{self.data} k={position.steps}, " + ("depth=0" if position.depth == 0 else "depth>=1")

    def check(self, trajectories: list[Trajectory]) -> None:
        Prefill(depths=self.depths).check(trajectories)

    def plan(self, items: list[tuple[Behavior, Trajectory]], context: PlanningContext) -> list[PlannedEpisode]:
        models = self.prepare(context, {behavior.id for behavior, _ in items})
        sweep = Prefill(depths=self.depths)
        planned = []
        for steps, model in models.items():
            def key(behavior: Behavior, position: BasePosition, steps: int = steps) -> str:
                return context.key(behavior, FinetunePosition(steps=steps, depth=position.depth))

            for episode in sweep.plan(items, replace(context, key=key)):
                episode.position = FinetunePosition(steps=steps, depth=episode.position.depth)
                episode.model = str(model)
                planned.append(episode)
        return planned

    def training_behaviors(self) -> list[Behavior]:
        from trajalign.train.sources import HarmfulSource, load_sources

        name = self.train_dataset or DEFAULT_TRAINING_SETS[self.data]
        return load_sources([HarmfulSource(name=name, limit=self.train_limit)])

    def prepare(self, context: PlanningContext, evaluated_ids: set[str]) -> dict[int, Path]:
        """Fine-tune the evaluated model once, to the largest k, keeping the model at every k: k -> its directory."""
        from trajalign.train.recipes import RecipeConfig
        from trajalign.train.sources import AnchorSource
        from trajalign.train.trainer import TrainConfig, model_at_step, run_training

        if context.workdir is None or context.model_spec is None:
            raise InputError("finetune: needs a run directory and the evaluated model's spec to fine-tune")
        behaviors = self.training_behaviors()
        clash = next((behavior for behavior in behaviors if behavior.id in evaluated_ids), None)
        if clash is not None:
            raise InputError(f"dataset '{clash.dataset}' behavior '{clash.id}': finetune would train on a behavior "
                             f"it evaluates; give training behaviors as train_dataset")
        out = context.workdir / "finetune" / self.data
        harmful = self.data == "harmful"
        config = TrainConfig(
            model=context.model_spec, recipe=RecipeConfig(name=f"{self.data}-sft", seed=self.seed),
            harmful=[], benign=[] if harmful else [AnchorSource(name=behaviors[0].dataset, answers="reference")],
            benign_limit=None, trajectories=self.train_trajectories, trajectory_tokens=self.train_tokens,
            anchor_tokens=self.train_tokens, learning_rate=self.learning_rate, batch_size=self.batch_size,
            max_steps=max(self.steps), save_models_at=self.steps, seed=self.seed, out=out)
        trajectories = load_trajectories(self.train_trajectories, behaviors, context.handle, self.train_tokens,
                                         cache_dir=context.workdir / "cache", backend=context.backend) \
            if harmful else {}
        run_training(config, harmful=behaviors if harmful else [], benign=[] if harmful else behaviors,
                     trajectories=trajectories, cache_dir=context.workdir / "cache")
        return {steps: model_at_step(out, steps, max(self.steps)) for steps in self.steps}
