"""Typed records of what was fed to a model and what came back."""

from __future__ import annotations

from pydantic import BaseModel, Field, computed_field

from trajalign.attacks import Attack, Position


class Verdict(BaseModel):
    """One judge's reading of an episode."""

    refused_continuation: bool = Field(description="a refusal begins in the continuation within the window")
    refused_answer: bool = Field(description="a refusal begins in injected prefix + continuation within the window")
    score: float | None = None
    attempts_task: bool | None = Field(default=None, description="the answer attempts the task (judges that can "
                                                                 "tell; None where the judge does not say)")
    attempts_task_score: float | None = Field(default=None, description="the score behind attempts_task (pmi: "
                                                                        "nats per token)")


class Episode(BaseModel):
    """Behavior x trajectory x attack x one position: exact ids in and out, verdicts and timing."""

    episode_id: str
    model: str
    behavior_id: str
    dataset: str
    prompt: str
    attack: Attack
    position: Position
    depth: int | None = Field(default=None, description="assistant tokens before the continuation")
    defense: str | None = None
    trajectory_source: str | None = Field(default=None, description="where the injected trajectory came from "
                                          "(model:SPEC, model:SPEC@T=1, target, column:NAME); None where the "
                                          "attack injects none, and in records written before it was kept")
    ablation: str | None = Field(default=None, description="the refusal direction projected out of the residual "
                                 "stream while the model ran (its file); None: no ablation")
    context_ids: list[int]
    answer_start: int = Field(description="index in context_ids where the assistant turn begins")
    injected_spans: list[tuple[int, int]] = Field(
        default_factory=list, description="[start, end) in context_ids of tokens the model did not write")
    continuation_ids: list[int]
    continuation_text: str
    finish_reason: str
    exact_ids: bool = Field(description="the model was fed context_ids and gave continuation_ids as token ids; "
                                        "False where a server was sent text or answered in text")
    verdicts: dict[str, Verdict] = Field(default_factory=dict)
    refused: bool = Field(description="primary judge: a refusal begins in the continuation (within the window)")
    reset: bool = Field(default=False, description="backtracking models: a reset token within the window, which "
                        "counts as a refusal; the judges read what follows it")
    generation_s: float = 0.0

    @computed_field
    @property
    def attack_kind(self) -> str:
        return self.attack.kind

    @computed_field
    @property
    def sample(self) -> int:
        return self.position.sample
