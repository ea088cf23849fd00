"""Settings of the field's deep-alignment methods, trained as recipes beside the trajectory recipe (comparators)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ReroutingSettings(BaseModel):
    """Circuit breakers by representation rerouting (Zou et al. 2024), with the reference implementation's values."""

    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(default=10.0, gt=0, description="loss scale a: rerouting weight a(1 - t/2T), retain "
                         "weight a t/2T at optimizer step t of T")
    layers: list[int] | None = Field(default=None, min_length=1, description="decoder blocks (from 0) whose "
                                     "outputs are rerouted; default the blocks at one and two thirds of the depth "
                                     "(the paper's 10 and 20 of 32); LoRA covers every block up to the deepest")
    rerouting_only: float = Field(default=0.0, ge=0, lt=1, description="share of the optimizer steps, at the "
                                  "start, whose retain weight is 0 (the paper's schedule: 0). In float32 the "
                                  "adapted states start equal to the original's, where the cosine has zero "
                                  "gradient and the retain distance a gradient of unit size, so from the second "
                                  "step on the retain term holds the adapter at the original")


class AblationSettings(BaseModel):
    """Refusal-direction ablation during training (ReFAT, Yu et al. 2024; DeepRefusal 2025)."""

    model_config = ConfigDict(extra="forbid")
    probability: float = Field(default=0.5, ge=0, le=1, description="share of harmful rows trained with the "
                               "refusal direction projected out of their residual stream")
    positions: Literal["all", "random"] = Field(default="all", description="ablate at every token of a chosen "
                                                "row, or at a random share of them")
    position_probability: float = Field(default=0.5, gt=0, le=1, description="random positions: share ablated")
    refresh_steps: int = Field(default=4, gt=0, description="recompute the direction from the current model "
                               "every this many optimizer steps")
    direction_prompts: int = Field(default=32, gt=0, description="harmful and harmless training prompts (each) "
                                   "sampled for a recomputation")


class BacktrackingSettings(BaseModel):
    """Backtracking with a reset token (Zhang et al. 2024)."""

    model_config = ConfigDict(extra="forbid")
    token: str = Field(default="[RESET]", min_length=1, description="the special token added to the vocabulary")
    token_learning_rate_scale: float = Field(default=1.0, gt=0, description="full fine-tuning with frozen "
                                             "embeddings: the reset token's (tied) embedding row learns at this "
                                             "multiple of the learning rate. It starts at the mean row, and Adam "
                                             "moves a weight about one learning rate per step, so at 3e-4 a few "
                                             "dozen steps leave its logit far below the top token's")
