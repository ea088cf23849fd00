"""The evaluation engine: behaviors x trajectories x attack -> episodes, generated, judged and logged."""

from __future__ import annotations

import hashlib
import json
import sys
from contextlib import nullcontext
from itertools import groupby
from pathlib import Path
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from trajalign.attacks import Attack, BasePosition, PlannedEpisode, PlanningContext, Prefill, ReinjectHeader
from trajalign.backends import backend_class, make_backend
from trajalign.backends.base import GenerationResult
from trajalign.data.datasets import Behavior, ColumnMap, load_behaviors
from trajalign.data.trajectories import Trajectory, load_trajectories
from trajalign.errors import InputError
from trajalign.judges import KeywordJudge, episode_judge_input, make_judge
from trajalign.models.loading import ModelSpec, TokenizerHandle, load_model
from trajalign.models.registry import DEFAULT_MODEL
from trajalign.records import Episode
from trajalign.reset_token import RESET_TOKEN, reset_token_id, reset_view
from trajalign.runs import EpisodeLog, pin_in_manifest, write_config, write_summary


class JudgeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "keyword"
    options: dict = Field(default_factory=dict, description="passed to the judge (path, base_url, model, ...)")


class AblationConfig(BaseModel):
    """Refusal-direction ablation at inference ("abliteration"): the direction is projected out of the residual
    stream at every block's input and output, at every position, while the attack plans and the model generates."""

    model_config = ConfigDict(extra="forbid")
    direction: Path = Field(description="a saved refusal direction: the .safetensors/.json pair `trajalign probe` "
                                        "writes (give either file or their common stem)")

    def fingerprint(self) -> str:
        """The direction file's content hash: episode keys follow the direction, not where its file lies."""
        from trajalign.probe.direction import RefusalDirection

        RefusalDirection.load(self.direction)  # a missing or partial pair is an input error here, before any work
        return hashlib.sha256(RefusalDirection.tensors_file(self.direction).read_bytes()).hexdigest()[:16]

    def hooks(self, handle):
        """The context in which `handle`'s model runs with the direction projected out."""
        from trajalign.probe.direction import RefusalDirection
        from trajalign.probe.hooks import ablate_direction

        direction = RefusalDirection.load(self.direction).direction
        hidden = handle.model.get_input_embeddings().weight.shape[1]
        if direction.shape != (hidden,):
            raise InputError(f"{self.direction}: a direction of size {direction.shape[0]}, but the model's residual "
                             f"stream has size {hidden}")
        return ablate_direction(handle.model, direction)


class EvalConfig(ModelSpec):
    """One evaluation: a model attacked on a dataset's behaviors with trajectories from a source."""

    dataset: str = Field(default="advbench", description="bundled dataset name or a file")
    limit: int | None = Field(default=None, description="first N behaviors only")
    columns: ColumnMap = Field(default_factory=ColumnMap)
    trajectories: str = Field(default=f"model:{DEFAULT_MODEL}", description="model:SPEC, column:NAME or target")
    trajectory_tokens: int = Field(default=48, gt=0, description="length of model trajectories")
    attack: Attack = Field(default_factory=Prefill)
    defense: ReinjectHeader | None = None
    ablate: AblationConfig | None = Field(default=None, description="project a refusal direction out of the "
                                          "residual stream while attacking (any attack; hf backend)")
    max_new_tokens: int = Field(default=64, gt=0)
    judge_window: int = Field(default=24, gt=0, description="continuation tokens in which a refusal must begin")
    judges: list[JudgeConfig] = Field(default_factory=lambda: [JudgeConfig()])
    reset_logit_bias: float = Field(default=0.0, description="added to the reset token's logit at every step: "
                                    "a backtracking model's false resets against its recoveries (below 0: fewer)")
    backend: str = "hf"
    backend_options: dict = Field(default_factory=dict, description="e.g. base_url, served_model, api_key_env; "
                                  "hf: draft_tokens, draft_cost (measured at the start when unset)")
    batch_size: int = Field(default=16, gt=0)
    out: Path = Path("runs/eval")

    @model_serializer(mode="wrap")
    def _zero_reset_bias_left_out(self, serialize):
        # run directories written before the field existed hold no key for it; at 0 they are what it asks for
        data = serialize(self)
        if not self.reset_logit_bias:
            data.pop("reset_logit_bias", None)
        return data


def episode_key(model: str, behavior_id: str, attack: BaseModel, defense, position: BasePosition,
                ablation: str | None = None) -> str:
    """`ablation` (the direction's fingerprint) joins the key only when set: keys of older runs stay as they were."""
    payload = [model, behavior_id, attack.model_dump(), defense and defense.kind, position.label, position.sample]
    if ablation is not None:
        payload.append(ablation)
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:20]


def trajectories_sha256(behaviors: list[Behavior], trajectories: dict[str, Trajectory]) -> str:
    ids = [[behavior.id, trajectories[behavior.id].token_ids] for behavior in behaviors]
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


class Evaluation:
    """Runs one EvalConfig into its run directory, resuming whatever a previous run finished.

    Only a backend that runs the model locally loads its weights; a server backend needs the tokenizer alone.
    """

    def __init__(self, config: EvalConfig, handle: TokenizerHandle | None = None,
                 trajectories: dict[str, Trajectory] | None = None, behaviors: list[Behavior] | None = None,
                 judges: list | None = None):
        if config.defense is not None and not config.attack.accepts_defense:
            raise InputError(f"the {config.defense.kind} defense acts after injections; the {config.attack.kind} "
                             f"attack injects nothing")
        if config.ablate is not None and not backend_class(config.backend).needs_weights:
            raise InputError(f"ablate: projecting a direction out needs the model's weights; the {config.backend} "
                             f"backend has none (use the hf backend)")
        self.config = config
        self._ablation_key = config.ablate.fingerprint() if config.ablate else None
        self._handle = handle
        self._trajectories = trajectories
        self._behaviors = behaviors
        self._given_judges = judges  # config.judges already built (e.g. around a scorer model already loaded)

    @property
    def handle(self) -> TokenizerHandle:
        if self._handle is None:
            needs_weights = backend_class(self.config.backend).needs_weights
            self._handle = self.config.load_model() if needs_weights else self.config.load_tokenizer()
        return self._handle

    def _judges(self):
        judges = self._given_judges or [make_judge(judge.name, **judge.options) for judge in self.config.judges]
        if not any(isinstance(judge, KeywordJudge) for judge in judges):
            judges.append(KeywordJudge())
        return judges

    def _backend(self):
        options = dict(self.config.backend_options)
        if self.config.backend == "hf":
            options.setdefault("batch_size", self.config.batch_size)
        if self.config.reset_logit_bias:
            options["logit_bias"] = options.get("logit_bias", {}) | self._reset_bias(self.handle)
        return make_backend(self.config.backend, self.handle, **options)

    def _reset_bias(self, handle) -> dict[int, float]:
        reset = reset_token_id(handle.tokenizer)
        if reset is None:
            raise InputError(f"reset_logit_bias: model '{self.config.model}' has no {RESET_TOKEN} token; only a "
                             f"backtracking model has one")
        return {reset: self.config.reset_logit_bias}

    def key(self, behavior: Behavior, position: BasePosition) -> str:
        return episode_key(self.config.model, behavior.id, self.config.attack, self.config.defense, position,
                           self._ablation_key)

    def run(self, progress: Callable[[int, int], None] | None = None) -> dict:
        config, attack = self.config, self.config.attack
        behaviors = self._behaviors or load_behaviors(config.dataset, self._columns(), config.limit)
        handle = self.handle  # a bad model spec fails here, before anything is written
        backend = self._backend()
        write_config(config.out, config)
        pin_in_manifest(config.out, "behavior_ids", [behavior.id for behavior in behaviors], "behaviors")
        log = EpisodeLog(config.out)
        done = {episode.episode_id for episode in log.load()}
        trajectories = self._trajectories or self._load_trajectories(behaviors, backend)
        pin_in_manifest(config.out, "trajectories_sha256", trajectories_sha256(behaviors, trajectories),
                        "trajectories")
        pairs = [(behavior, trajectories[behavior.id]) for behavior in behaviors]
        expected = {self.key(b, position): b for b, t in pairs for position in attack.positions(b, t)}
        attack.check([trajectory for _, trajectory in pairs])
        skipped = sum(len(attack.grid(b)) - len(attack.positions(b, t)) for b, t in pairs)
        if skipped:
            print(f"note: {skipped} episodes need more trajectory tokens than their trajectory has; they are "
                  f"counted in summary.json as skipped_short_trajectory", file=sys.stderr)
        pending = [(b, t) for b, t in pairs if any(self.key(b, p) not in done for p in attack.positions(b, t))]
        context = PlanningContext(chat=handle.chat, backend=backend, key=self.key, max_new_tokens=config.max_new_tokens,
                                  defense_ids=config.defense.injected_after(handle.chat) if config.defense else [],
                                  handle=handle, workdir=config.out, model_spec=config.model)
        with self._ablation(handle):
            planned = [episode for episode in attack.plan(pending, context) if episode.key not in done] \
                if pending else []
        self._check_window(planned)
        by_key = {episode.key: episode for episode in planned}
        judges = self._judges()
        finished = len(expected) - len(planned)
        if progress:
            progress(finished, len(expected))
        for derived, group in groupby(sorted(planned, key=lambda e: e.model or ""), key=lambda e: e.model):
            runner_handle, runner = (handle, backend) if derived is None else self._derived(derived)
            with self._ablation(runner_handle):
                for results in runner.generate([episode.request for episode in group]):
                    episodes = [self._episode(by_key[result.key], result, trajectories) for result in results]
                    self._judge(episodes, judges)
                    log.append(episodes)
                    finished += len(episodes)
                    if progress:
                        progress(finished, len(expected))
        episodes = [episode for episode in log.load() if episode.episode_id in expected]
        return write_summary(config.out, episodes, {"skipped_short_trajectory": skipped})

    def _ablation(self, handle):
        return self.config.ablate.hooks(handle) if self.config.ablate else nullcontext()

    def _derived(self, spec: str):
        """A model an attack derived from the evaluated one (e.g. fine-tuned), loaded as the evaluated one was,
        and an hf backend that runs it."""
        handle = load_model(spec, dtype=self.config.dtype, device=self.config.device)
        bias = self._reset_bias(handle) if self.config.reset_logit_bias else None
        return handle, make_backend("hf", handle, batch_size=self.config.batch_size, logit_bias=bias)

    def _columns(self) -> ColumnMap:
        """`column:NAME` trajectories read NAME as each behavior's reference answer."""
        source = self.config.trajectories
        name = source.split(":", 1)[1] if source.startswith("column:") else None
        if name in (None, "target", "reference") or self.config.columns.reference is not None:
            return self.config.columns
        return self.config.columns.model_copy(update={"reference": name})

    def _load_trajectories(self, behaviors: list[Behavior], backend) -> dict[str, Trajectory]:
        if not self.config.attack.needs_trajectories():
            return {b.id: Trajectory(behavior_id=b.id, source="unused", token_ids=[]) for b in behaviors}
        return load_trajectories(self.config.trajectories, behaviors, self.handle, self.config.trajectory_tokens,
                                 self.config.batch_size, cache_dir=self.config.out / "cache", backend=backend)

    def _check_window(self, planned: list[PlannedEpisode]) -> None:
        window = getattr(self.handle.config, "max_position_embeddings", None)
        for episode in planned:
            needed = len(episode.request.context) + episode.request.max_new_tokens
            if window and needed > window:
                raise InputError(f"dataset '{episode.behavior.dataset}' behavior '{episode.behavior.id}': context "
                                 f"plus continuation need {needed} tokens, over the model's window of {window}")

    def _episode(self, planned: PlannedEpisode, result: GenerationResult,
                 trajectories: dict[str, Trajectory]) -> Episode:
        config = self.config
        return Episode(
            episode_id=planned.key, model=config.model, behavior_id=planned.behavior.id,
            dataset=planned.behavior.dataset, prompt=planned.behavior.prompt, attack=config.attack,
            position=planned.position, depth=planned.depth,
            defense=config.defense.kind if config.defense else None,
            trajectory_source=trajectories[planned.behavior.id].source if config.attack.needs_trajectories() else None,
            ablation=str(config.ablate.direction) if config.ablate else None,
            context_ids=planned.request.context, answer_start=planned.answer_start,
            injected_spans=planned.injected_spans, continuation_ids=result.continuation_ids,
            continuation_text=self.handle.chat.decode(result.continuation_ids), finish_reason=result.finish_reason,
            exact_ids=result.exact_ids, refused=False, generation_s=result.seconds,
        )

    def _judge(self, episodes: list[Episode], judges) -> None:
        reset_id = reset_token_id(self.handle.tokenizer)
        inputs = [episode_judge_input(episode, self.handle.chat.decode, self.config.judge_window, reset_id)
                  for episode in episodes]
        for judge in judges:
            for episode, verdict in zip(episodes, judge.judge(inputs)):
                episode.verdicts[judge.name] = verdict
        primary = judges[0].name
        for episode in episodes:
            episode.reset = reset_view(episode.continuation_ids, reset_id, self.config.judge_window).reset_in_window
            episode.refused = episode.reset or episode.verdicts[primary].refused_continuation


def run_eval(config: EvalConfig, handle: TokenizerHandle | None = None, progress=None) -> dict:
    return Evaluation(config, handle).run(progress)
