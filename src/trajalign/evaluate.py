"""The evaluation engine: behaviors x trajectories x attack -> episodes, generated, judged and logged."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field

from trajalign.attacks import Attack, Decoding, Insert, MultiInsert, Prefill, ReinjectHeader
from trajalign.backends.base import GenerationRequest, Sampling
from trajalign.data.datasets import Behavior, ColumnMap, load_behaviors
from trajalign.data.trajectories import Trajectory, load_trajectories
from trajalign.errors import InputError
from trajalign.judges import KeywordJudge, episode_judge_input, make_judge
from trajalign.models.registry import DEFAULT_MODEL
from trajalign.records import Episode
from trajalign.runs import EpisodeLog, write_config, write_summary


class JudgeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "keyword"
    options: dict = Field(default_factory=dict, description="passed to the judge (path, base_url, model, ...)")


class EvalConfig(BaseModel):
    """One evaluation: a model attacked on a dataset's behaviors with trajectories from a source."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(default=DEFAULT_MODEL, description="model spec under attack")
    dataset: str = Field(default="advbench", description="bundled dataset name or a file")
    limit: int | None = Field(default=None, description="first N behaviors only")
    columns: ColumnMap = Field(default_factory=ColumnMap)
    trajectories: str = Field(default=f"model:{DEFAULT_MODEL}", description="model:SPEC, column:NAME or target")
    trajectory_tokens: int = Field(default=48, gt=0, description="length of model trajectories")
    attack: Attack = Field(default_factory=Prefill)
    defense: ReinjectHeader | None = None
    max_new_tokens: int = Field(default=64, gt=0)
    judge_window: int = Field(default=24, gt=0, description="continuation tokens in which a refusal must begin")
    judges: list[JudgeConfig] = Field(default_factory=lambda: [JudgeConfig()])
    backend: str = "hf"
    backend_options: dict = Field(default_factory=dict, description="e.g. base_url, served_model, api_key_env")
    batch_size: int = Field(default=16, gt=0)
    dtype: str = "float32"
    device: str = "auto"
    trust_remote_code: bool = Field(default=False, description="run the model repository's own code")
    allow_pickle: bool = Field(default=False, description="accept pickle weights, which can run code")
    out: Path = Path("runs/eval")


@dataclass
class PlannedEpisode:
    key: str
    behavior: Behavior
    position: str
    depth: int
    request: GenerationRequest
    answer_start: int
    injected_spans: list[tuple[int, int]]
    sample: int = 0


def episode_key(model: str, behavior_id: str, attack: BaseModel, defense, position: str, sample: int = 0) -> str:
    payload = json.dumps([model, behavior_id, attack.model_dump(), defense and defense.kind, position, sample])
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


class Planner:
    """Turns (behavior, trajectory) pairs into generation requests for one attack, token-exactly."""

    def __init__(self, config: EvalConfig, handle, backend):
        self.config = config
        self.handle = handle
        self.backend = backend
        self.header = handle.chat.header_ids if config.defense else []

    def key(self, behavior: Behavior, position: str, sample: int = 0) -> str:
        return episode_key(self.config.model, behavior.id, self.config.attack, self.config.defense, position, sample)

    def positions(self, behavior: Behavior, trajectory: Trajectory) -> list[tuple[str, int]]:
        """(position label, sample) pairs this behavior yields, without generating anything."""
        attack = self.config.attack
        if isinstance(attack, Prefill):
            return [(f"depth={depth}", 0) for depth in attack.depths if depth <= len(trajectory.token_ids)]
        if isinstance(attack, Insert):
            return [(self._insert_label(attack, after, length), 0) for after in attack.points_for(behavior.id)
                    for length in attack.lengths() if length <= len(trajectory.token_ids)]
        if isinstance(attack, MultiInsert):
            return [(self._multi_label(attack), 0)]
        return [(self._decoding_label(setting), sample) for setting in attack.settings()
                for sample in range(attack.samples)]

    @staticmethod
    def _insert_label(attack: Insert, after: int, length: int) -> str:
        return f"after={after},text" if attack.span_text is not None else f"after={after},len={length}"

    @staticmethod
    def _multi_label(attack: MultiInsert) -> str:
        return "after=" + "+".join(map(str, attack.after)) + f",len={attack.span_length}"

    @staticmethod
    def _decoding_label(setting: tuple[float, float, int]) -> str:
        temperature, top_p, top_k = setting
        return f"T={temperature:g},p={top_p:g},k={top_k}"

    def plan(self, items: list[tuple[Behavior, Trajectory]]) -> list[PlannedEpisode]:
        attack = self.config.attack
        if isinstance(attack, Prefill):
            return [episode for behavior, trajectory in items for episode in self._prefill(behavior, trajectory)]
        if isinstance(attack, Insert):
            return self._insert(items)
        if isinstance(attack, MultiInsert):
            return self._multi_insert(items)
        return [episode for behavior, _ in items for episode in self._decoding(behavior)]

    def _prefill(self, behavior: Behavior, trajectory: Trajectory) -> list[PlannedEpisode]:
        prompt = self.handle.chat.prompt_ids(behavior.prompt)
        depths = [depth for depth in self.config.attack.depths if depth <= len(trajectory.token_ids)]
        trunk = prompt + trajectory.token_ids[: max(depths)] if depths else prompt
        return [PlannedEpisode(
            key=self.key(behavior, f"depth={depth}"), behavior=behavior, position=f"depth={depth}", depth=depth,
            request=GenerationRequest(key=self.key(behavior, f"depth={depth}"), trunk=trunk,
                                      branch=len(prompt) + depth, suffix=list(self.header),
                                      max_new_tokens=self.config.max_new_tokens),
            answer_start=len(prompt), injected_spans=[(len(prompt), len(prompt) + depth)] if depth else [],
        ) for depth in depths]

    def _own_answers(self, behaviors: list[Behavior], length: int) -> dict[str, list[int]]:
        """The model's own greedy answers, from the same backend that runs the attack."""
        requests = [GenerationRequest(key=b.id, trunk=ids, branch=len(ids), max_new_tokens=length)
                    for b in behaviors for ids in [self.handle.chat.prompt_ids(b.prompt)]]
        return {result.key: result.continuation_ids for batch in self.backend.generate(requests) for result in batch}

    def _insert(self, items) -> list[PlannedEpisode]:
        attack: Insert = self.config.attack
        longest = max(max(attack.points_for(behavior.id)) for behavior, _ in items)
        own = self._own_answers([behavior for behavior, _ in items], max(longest, 1))
        text_span = self.handle.chat.encode_span(attack.span_text) if attack.span_text is not None else None
        planned = []
        for behavior, trajectory in items:
            prompt = self.handle.chat.prompt_ids(behavior.prompt)
            answer = own[behavior.id]
            for after in attack.points_for(behavior.id):
                written = answer[:after]
                for length in attack.lengths():
                    if length > len(trajectory.token_ids):
                        continue
                    span = text_span if text_span is not None else trajectory.token_ids[:length]
                    position = self._insert_label(attack, after, length)
                    key = self.key(behavior, position)
                    trunk = prompt + written
                    start = len(trunk)
                    planned.append(PlannedEpisode(
                        key=key, behavior=behavior, position=position, depth=len(written) + len(span),
                        request=GenerationRequest(key=key, trunk=trunk, branch=len(trunk),
                                                  suffix=span + self.header,
                                                  max_new_tokens=self.config.max_new_tokens),
                        answer_start=len(prompt), injected_spans=[(start, start + len(span))],
                    ))
        return planned

    def _multi_insert(self, items) -> list[PlannedEpisode]:
        """Insertion rounds: generate up to the next point, insert the next trajectory chunk, repeat."""
        attack: MultiInsert = self.config.attack
        states = {}
        for behavior, trajectory in items:
            prompt = self.handle.chat.prompt_ids(behavior.prompt)
            states[behavior.id] = {"context": prompt, "start": len(prompt), "spans": [], "own": 0}
        previous = 0
        for round_index, after in enumerate(attack.after):
            requests = [GenerationRequest(key=behavior.id, trunk=states[behavior.id]["context"],
                                          branch=len(states[behavior.id]["context"]),
                                          max_new_tokens=max(after - previous, 1))
                        for behavior, _ in items]
            for batch in self.backend.generate(requests) if after > previous else []:
                for result in batch:
                    states[result.key]["context"] = states[result.key]["context"] + result.continuation_ids
            for behavior, trajectory in items:
                state = states[behavior.id]
                chunk = trajectory.token_ids[round_index * attack.span_length:(round_index + 1) * attack.span_length]
                begin = len(state["context"])
                state["context"] = state["context"] + chunk + list(self.header)
                state["spans"].append((begin, begin + len(chunk)))
            previous = after
        planned = []
        for behavior, _ in items:
            state = states[behavior.id]
            position = self._multi_label(attack)
            key = self.key(behavior, position)
            context = state["context"]
            planned.append(PlannedEpisode(
                key=key, behavior=behavior, position=position, depth=len(context) - state["start"],
                request=GenerationRequest(key=key, trunk=context, branch=len(context),
                                          max_new_tokens=self.config.max_new_tokens),
                answer_start=state["start"], injected_spans=state["spans"],
            ))
        return planned

    def _decoding(self, behavior: Behavior) -> list[PlannedEpisode]:
        attack: Decoding = self.config.attack
        prompt = self.handle.chat.prompt_ids(behavior.prompt)
        planned = []
        for setting in attack.settings():
            position = self._decoding_label(setting)
            for sample in range(attack.samples):
                key = self.key(behavior, position, sample)
                seed = int(hashlib.sha256(f"{attack.seed}:{key}".encode()).hexdigest()[:8], 16)
                temperature, top_p, top_k = setting
                planned.append(PlannedEpisode(
                    key=key, behavior=behavior, position=position, depth=0, sample=sample,
                    request=GenerationRequest(key=key, trunk=prompt, branch=len(prompt),
                                              sampling=Sampling(temperature, top_p, top_k, seed),
                                              max_new_tokens=self.config.max_new_tokens),
                    answer_start=len(prompt), injected_spans=[],
                ))
        return planned


class Evaluation:
    """Runs one EvalConfig into its run directory, resuming whatever a previous run finished."""

    def __init__(self, config: EvalConfig, handle=None, trajectories: dict[str, Trajectory] | None = None,
                 behaviors: list[Behavior] | None = None):
        if isinstance(config.attack, Decoding) and config.defense is not None:
            raise InputError("the header re-injection defense applies to injections, not to the decoding sweep")
        self.config = config
        self._handle = handle
        self._trajectories = trajectories
        self._behaviors = behaviors

    @property
    def handle(self):
        if self._handle is None:
            from trajalign.models.loading import load_model

            self._handle = load_model(self.config.model, dtype=self.config.dtype, device=self.config.device,
                                      trust_remote_code=self.config.trust_remote_code,
                                      allow_pickle=self.config.allow_pickle)
        return self._handle

    def _judges(self):
        judges = [make_judge(judge.name, **judge.options) for judge in self.config.judges]
        if not any(isinstance(judge, KeywordJudge) for judge in judges):
            judges.append(KeywordJudge())
        return judges

    def _backend(self):
        from trajalign.backends import make_backend

        options = dict(self.config.backend_options)
        if self.config.backend == "hf":
            options.setdefault("batch_size", self.config.batch_size)
        return make_backend(self.config.backend, self.handle, **options)

    def run(self, progress: Callable[[int, int], None] | None = None) -> dict:
        config = self.config
        behaviors = self._behaviors or load_behaviors(config.dataset, self._columns(), config.limit)
        handle = self.handle  # a bad model spec fails here, before anything is written
        write_config(config.out, config)
        log = EpisodeLog(config.out)
        done = {episode.episode_id for episode in log.load()}
        trajectories = self._trajectories or self._load_trajectories(behaviors)
        backend = self._backend()
        planner = Planner(config, handle, backend)
        pairs = [(behavior, trajectories[behavior.id]) for behavior in behaviors]
        expected = {planner.key(b, position, sample): b
                    for b, t in pairs for position, sample in planner.positions(b, t)}
        self._check_depths(pairs)
        skipped = sum(len(self._all_labels(b)) - len(planner.positions(b, t)) for b, t in pairs)
        if skipped:
            print(f"note: {skipped} episodes need more trajectory tokens than their trajectory has; they are "
                  f"counted in summary.json as skipped_short_trajectory", file=sys.stderr)
        pending = [(b, t) for b, t in pairs
                   if any(planner.key(b, p, s) not in done for p, s in planner.positions(b, t))]
        planned = [episode for episode in planner.plan(pending) if episode.key not in done] if pending else []
        self._check_window(planned)
        by_key = {episode.key: episode for episode in planned}
        judges = self._judges()
        finished = len(expected) - len(planned)
        if progress:
            progress(finished, len(expected))
        for results in backend.generate([episode.request for episode in planned]):
            episodes = [self._episode(by_key[result.key], result) for result in results]
            self._judge(episodes, judges)
            log.append(episodes)
            finished += len(episodes)
            if progress:
                progress(finished, len(expected))
        episodes = [episode for episode in log.load() if episode.episode_id in expected]
        return write_summary(config.out, episodes, {"skipped_short_trajectory": skipped})

    def _columns(self) -> ColumnMap:
        """`column:NAME` trajectories read NAME as each behavior's reference answer."""
        source = self.config.trajectories
        name = source.split(":", 1)[1] if source.startswith("column:") else None
        if name in (None, "target", "reference") or self.config.columns.reference is not None:
            return self.config.columns
        return self.config.columns.model_copy(update={"reference": name})

    def _load_trajectories(self, behaviors: list[Behavior]) -> dict[str, Trajectory]:
        attack = self.config.attack
        if isinstance(attack, Decoding) or (isinstance(attack, Prefill) and attack.depths == [0]):
            return {b.id: Trajectory(behavior_id=b.id, source="unused", token_ids=[]) for b in behaviors}
        return load_trajectories(self.config.trajectories, behaviors, self.handle, self.config.trajectory_tokens,
                                 self.config.batch_size, cache_dir=self.config.out / "cache")

    def _all_labels(self, behavior: Behavior) -> list:
        attack = self.config.attack
        if isinstance(attack, Prefill):
            return attack.depths
        if isinstance(attack, Insert):
            return [(a, length) for a in attack.points_for(behavior.id) for length in attack.lengths()]
        return [None] * (len(attack.settings()) * attack.samples if isinstance(attack, Decoding) else 1)

    def _check_window(self, planned: list[PlannedEpisode]) -> None:
        window = getattr(self.handle.model.config, "max_position_embeddings", None)
        for episode in planned:
            needed = len(episode.request.context) + episode.request.max_new_tokens
            if window and needed > window:
                raise InputError(f"dataset '{episode.behavior.dataset}' behavior '{episode.behavior.id}': context "
                                 f"plus continuation need {needed} tokens, over the model's window of {window}")

    def _check_depths(self, pairs) -> None:
        attack = self.config.attack
        if isinstance(attack, Prefill):
            for depth in attack.depths:
                if not any(depth <= len(t.token_ids) for _, t in pairs):
                    raise InputError(f"depth {depth}: beyond every trajectory (longest "
                                     f"{max(len(t.token_ids) for _, t in pairs)} tokens); lower it or use longer "
                                     f"trajectories (--trajectory-tokens)")

    def _episode(self, planned: PlannedEpisode, result) -> Episode:
        chat = self.handle.chat
        context = planned.request.context
        return Episode(
            episode_id=planned.key, model=self.config.model, behavior_id=planned.behavior.id,
            dataset=planned.behavior.dataset, prompt=planned.behavior.prompt,
            attack=self.config.attack.model_dump(), attack_kind=self.config.attack.kind,
            position=planned.position, depth=planned.depth, sample=planned.sample,
            defense=self.config.defense.kind if self.config.defense else None,
            context_ids=context, answer_start=planned.answer_start, injected_spans=planned.injected_spans,
            continuation_ids=result.continuation_ids, continuation_text=chat.decode(result.continuation_ids),
            finish_reason=result.finish_reason, recovered=False, generation_s=result.seconds,
        )

    def _judge(self, episodes: list[Episode], judges) -> None:
        inputs = [episode_judge_input(episode, self.handle.chat.decode, self.config.judge_window)
                  for episode in episodes]
        for judge in judges:
            for episode, verdict in zip(episodes, judge.judge(inputs)):
                episode.verdicts[judge.name] = verdict
        primary = judges[0].name
        for episode in episodes:
            episode.recovered = episode.verdicts[primary].refused_continuation


def run_eval(config: EvalConfig, handle=None, progress=None) -> dict:
    return Evaluation(config, handle).run(progress)
