"""`trajalign reproduce`: the whole study in miniature on the embedded model, stage by stage, resumable.

Stages: split AdvBench by behavior; harmful trajectories from the original (unaligned) model, and its own answers to
the everyday benign prompts; the original model evaluated and probed; then, one after the other, a shallow model
(refusal-sft) and a deep one (trajectory recipe), each trained (on benign anchors too; the deep one also on CatQA,
CoCoNot and Dolly, `trajectory_data`), evaluated the same way and probed (refusal direction, and the original's
direction for the between-model view); a summary and the report. One model is resident at a time, and each is
loaded once for its stages.

Each model is evaluated on both sides of depth: harmful prompts (refusal at depth 0, recovery after a prefill of k
tokens of a harmful answer and after an insertion into its own answer) and benign ones (over-refusal at depth 0 per
source with the pmi judge's "attempts the task"; benign controls: the same prefill depths of the original model's
own benign answer, and a span of another benign answer inserted, where a refusal is a false break; the likelihood of
human reference answers against the original's). `trajalign.headline` puts them side by side.
"""

from __future__ import annotations

import ctypes
import gc
import json
import random
import re
import sys
import time
from contextlib import contextmanager
from itertools import zip_longest
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, model_validator

from trajalign.attacks import Decoding, Insert, Prefill
from trajalign.attacks.held_out import held_out_attacks
from trajalign.console import Display, LineDisplay
from trajalign.data.datasets import Behavior, is_benign, load_behaviors, write_behaviors
from trajalign.data.trajectories import Trajectory, load_trajectories
from trajalign.errors import InputError
from trajalign.evaluate import AblationConfig, EvalConfig, Evaluation, JudgeConfig
from trajalign.headline import BENIGN_INSERT, BENIGN_SWEEP, HARMFUL_INSERT, HARMFUL_SWEEP, from_summary, markdown
from trajalign.models.loading import load_model
from trajalign.models.registry import DEFAULT_MODEL
from trajalign.probe.run import ProbeConfig, run_probe
from trajalign.requirements import require
from trajalign.runs import EPISODES_FILE, EpisodeLog
from trajalign.stats import wilson_interval
from trajalign.train.iteration import RoundAttacks, final_model_dir, run_rounds
from trajalign.train.preference import PreferenceSettings
from trajalign.train.recipes import RecipeConfig
from trajalign.train.sources import AnchorSource, HarmfulSource, load_sources
from trajalign.train.trainer import LoraSettings, TrainConfig, run_training


class RoleTraining(BaseModel):
    """How one aligned model of the study is trained; every lever defaults to what the study did before it."""

    recipe: str | None = Field(default=None, description="the training recipe or comparator (default: refusal-sft "
                               "for shallow, trajectory for trajectory)")
    learning_rate: float | None = Field(default=None, gt=0, description="default: the preset's")
    epochs: float
    benign_ratio: float = Field(description="benign anchor rows per harmful row: the over-refusal lever")
    lora: LoraSettings | None = Field(default=None, description="train a LoRA adapter, merged on save")
    anchor_sources: list[AnchorSource] = Field(default=[], description="anchors from these sources beside the "
                                               "preset's, e.g. coconot-pref or dolly-train, each with its answers")
    harmful_sources: list[HarmfulSource] = Field(default=[], description="harmful training behaviors beside "
                                                 "AdvBench's training split, e.g. catqa:200")
    benign_mix: dict[str, float] = Field(default={"plain": 1.0}, description="benign perturbation rows "
                                         "(RecipeConfig.benign_mix)")
    kl_weight: float = Field(default=0.0, ge=0, description="benign likelihood anchoring (TrainConfig.kl_weight)")
    preference: PreferenceSettings | None = Field(default=None, description="a DPO stage after SFT")
    rounds: int = Field(default=1, gt=0, description="on-policy rounds on the training behaviors")
    recipe_options: dict[str, Any] = Field(default={}, description="the recipe's own settings (RecipeConfig "
                                           "fields, e.g. {'rerouting': {'alpha': 5}} for circuit-breaker)")

    @model_validator(mode="after")
    def _recipe_options_fit_the_recipe(self) -> RoleTraining:
        taken = {"name", "benign_ratio", "benign_mix"} & set(self.recipe_options)
        if taken:
            raise ValueError(f"recipe_options: {', '.join(sorted(taken))} are set by the role's own fields")
        RecipeConfig(**self.recipe_options)  # an unknown or invalid option fails here, not after a training
        return self


class Preset(BaseModel):
    train_behaviors: int
    test_behaviors: int
    trajectory_tokens: int
    anchors: int
    anchor_tokens: int = Field(description="length of the benign answers trained on (self-distilled or the "
                               "datasets' own): the loss averages over tokens, so short anchors give their opening "
                               "(answer, not refuse) more weight")
    learning_rate: float = Field(default=3e-4, description="chosen on a validation split of training behaviors")
    training: dict[str, RoleTraining] = Field(description="per aligned model (shallow, trajectory)")
    depths: list[int] = [0, 5, 10, 20, 40]
    insert_after: int = 8
    insert_length: int = 10
    over_refusal_prompts: int = 20
    decoding: bool = False
    direction_prompts: int = 16
    layer_step: int = 6
    steering_prompts: int = Field(default=16, description="harmless prompts the direction is added to")
    held_out: str = Field(default="quick", description="which held-out attacks (trajalign.attacks.held_out) every "
                          "model faces: quick (random insertion) or full (all of them)")
    utility_prompts: int = Field(default=200, description="Dolly open_qa evaluation questions whose human answers "
                                 "measure utility (beside the Self-Instruct user tasks' answers)")
    continuation_tokens: int = Field(default=24, gt=0, description="tokens generated after each prompt or "
                                     "perturbation: what the judge reads (its window)")


# The field's deep-alignment methods, trained on the same behaviors and anchors as the trajectory recipe.
COMPARATORS = ("prefix-constrained", "rto", "circuit-breaker", "refusal-ablation", "backtracking")

def trajectory_data(harmful: int = 100, anchors: int = 200, benign_ratio: float = 2.0) -> dict:
    """The trajectory model's training data beyond the preset's behaviors and anchors, chosen on the validation
    split (benchmarks/recipe_validation.py, the README's ablation table): harmless requests that look unsafe
    (CoCoNot) and everyday questions (Dolly), with the datasets' own answers, two anchor rows per harmful row, and
    CatQA's harmful questions. At quick scale, against the former recipe (none of these): recovery at depth 40 90%
    against 52%, refusals of the four harmless sources 55/85/20/75% against 75/90/55/95%, NLL of the reference
    answers -6 / +4% (Dolly / Self-Instruct) against +9 / +10%; false breaks no better (44% against 32% at depth
    40, within the intervals elsewhere)."""
    return dict(benign_ratio=benign_ratio, harmful_sources=[HarmfulSource(name="catqa", limit=harmful)],
                anchor_sources=[AnchorSource(name=name, limit=anchors, answers="reference")
                                for name in ("coconot-pref", "dolly-train")])


TRAJECTORY_DATA = trajectory_data()

# Each comparator's settings in the compare preset where they differ from its paper's (trajalign.train.comparators)
# and the preset's learning rate, chosen on the validation split with the same effort per method: two settings
# each, one knob, picked by `selection_score` (benchmarks/recipe_validation.py; the grid is in the README), the
# paper's on a tie (refusal-ablation). The circuit breaker refuses nothing under any setting, so its setting was
# picked by blind hand labels of harmful continuations (gold/circuit-breaker/), among three: the third
# came with the fix that mixes its batches.
COMPARATOR_SETTINGS = {
    "circuit-breaker": {"learning_rate": 1e-3, "recipe_options": {"rerouting": {"rerouting_only": 0.25}}},
    "rto": {"recipe_options": {"rto_fraction": 0.5}},
    "backtracking": {"recipe_options": {"backtracking": {"token_learning_rate_scale": 30}}},
}

PRESETS = {
    # Every stage on a handful of behaviors, for a first look and for CI; its numbers mean nothing.
    "smoke": Preset(train_behaviors=8, test_behaviors=4, trajectory_tokens=16, anchors=8, anchor_tokens=16,
                    training={"shallow": RoleTraining(epochs=1, benign_ratio=1.0),
                              "trajectory": RoleTraining(epochs=1, **trajectory_data(2, 2, benign_ratio=1.0))},
                    depths=[0, 5, 10], insert_after=4, insert_length=5, over_refusal_prompts=4,
                    direction_prompts=4, layer_step=10, steering_prompts=4, utility_prompts=8,
                    continuation_tokens=12),
    "quick": Preset(train_behaviors=48, test_behaviors=20, trajectory_tokens=40, anchors=48, anchor_tokens=24,
                    training={"shallow": RoleTraining(epochs=2, benign_ratio=1.0),
                              "trajectory": RoleTraining(epochs=2, **TRAJECTORY_DATA)},
                    utility_prompts=60),
    # The shallow model's refusal rows are short: two epochs with each anchor twice cost what three epochs with
    # each once do, and halved its XSTest refusals on validation. For the trajectory model (before it took
    # `trajectory_data`), three epochs with anchors twice cut its over-refusal less than the extra time was worth.
    "full": Preset(train_behaviors=160, test_behaviors=40, trajectory_tokens=48, anchors=160, anchor_tokens=24,
                   training={"shallow": RoleTraining(epochs=2, benign_ratio=2.0),
                             "trajectory": RoleTraining(epochs=3, **TRAJECTORY_DATA)},
                   over_refusal_prompts=40, decoding=True, direction_prompts=32,
                   layer_step=3, held_out="full"),
    # Every comparator beside the study's two models, at the quick preset's sizes. Every model trains on the
    # trajectory model's data for the same two epochs, each comparator at its settings chosen on the validation
    # split (COMPARATOR_SETTINGS).
    "compare": Preset(train_behaviors=48, test_behaviors=20, trajectory_tokens=40, anchors=48, anchor_tokens=24,
                      training={"shallow": RoleTraining(epochs=2, **TRAJECTORY_DATA),
                                "trajectory": RoleTraining(epochs=2, **TRAJECTORY_DATA),
                                **{name: RoleTraining(recipe=name, epochs=2, **TRAJECTORY_DATA,
                                                      **COMPARATOR_SETTINGS.get(name, {}))
                                   for name in COMPARATORS}},
                      utility_prompts=60, held_out="compare"),
}
RECIPE_OF_ROLE = {"shallow": "refusal-sft", "trajectory": "trajectory"}
BENIGN_SFT_ROWS = 160  # the benign fine-tuning attack's training rows (the attack's default train_limit)
# A decode step of 64 rows costs far less than four of 16 (benchmarks/step_cost.py), so trajectories and
# evaluations, the sampled decoding sweep above all, run in wide batches.
GENERATION_BATCH_SIZE = 64
MAX_ANCHOR_PROMPT_CHARS = 300
ORIGINAL_TRAJECTORIES = f"model:{DEFAULT_MODEL}"
# The benign controls perturb everyday prompts (XSTest and CoCoNot look harmful on purpose; their controls would
# measure something else): a prefill of the original model's own answer, a span of another prompt's answer.
BENIGN_CONTROL_SOURCES = ("jbb-benign", "self-instruct-user")
BENIGN_INSERT_TRAJECTORIES = f"another:{ORIGINAL_TRAJECTORIES}"


def _normalized(prompt: str) -> str:
    return re.sub(r"\W+", " ", prompt.lower()).strip()


def without_advbench(behaviors: list[Behavior]) -> list[Behavior]:
    """Harmful behaviors from other sources, less any whose goal is an AdvBench goal: validation and test
    behaviors are AdvBench's, and none of them may be trained on."""
    advbench = {_normalized(behavior.prompt) for behavior in load_behaviors("advbench")}
    return [behavior for behavior in behaviors if _normalized(behavior.prompt) not in advbench]


def release_memory() -> None:
    """Collect what is unreachable and give the freed heap back to the system: glibc keeps it otherwise (after a
    training, about 1.7 GB of it), so each later stage would start that much higher."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def _shuffled_advbench(seed: int) -> list[Behavior]:
    behaviors = load_behaviors("advbench")
    random.Random(seed).shuffle(behaviors)
    return behaviors


def split_behaviors(preset: Preset, seed: int = 0) -> tuple[list[Behavior], list[Behavior]]:
    behaviors = _shuffled_advbench(seed)
    return behaviors[:preset.train_behaviors], behaviors[-preset.test_behaviors:]


def _xstest_stride(xstest: list[Behavior], count: int) -> int:
    """Test prompts are every stride-th XSTest safe prompt (spread over its types); validation takes those halfway."""
    return max(2, len(xstest) // count)


def benign_sets(preset: Preset) -> tuple[list[Behavior], dict[str, list[Behavior]]]:
    """Anchors train on half of JBB benign and Self-Instruct seed tasks, taken in turn so that any number of
    anchors holds both styles; over-refusal is measured per source, on JBB benign's other half, the Self-Instruct
    user tasks (evaluation-only), XSTest's safe prompts and CoCoNot's contrast set (evaluation-only), the last two
    spread over their types."""
    jbb = load_behaviors("jbb-benign")
    # long seed tasks (a page of input text) would set the padded width of whole training batches
    seed_tasks = [b for b in load_behaviors("self-instruct-seed") if len(b.prompt) <= MAX_ANCHOR_PROMPT_CHARS]
    in_turn = [b for pair in zip_longest(jbb[::2], seed_tasks) for b in pair if b is not None]
    anchors = in_turn[: preset.anchors]
    n = preset.over_refusal_prompts
    xstest = load_behaviors("xstest-safe")
    evaluation = {"xstest-safe": xstest[:: _xstest_stride(xstest, n)][:n],
                  "jbb-benign": jbb[1::2][: n // 2],
                  "self-instruct-user": load_behaviors("self-instruct-user")[: n - n // 2],
                  "coconot-contrast": load_behaviors("coconot-contrast")[::2][:n]}
    return anchors, evaluation


def benign_control_behaviors(over_refusal: dict[str, list[Behavior]]) -> list[Behavior]:
    return [behavior for source in BENIGN_CONTROL_SOURCES for behavior in over_refusal[source]]


def validation_sets(preset: Preset, size: int = 40, seed: int = 0) -> tuple[list[Behavior], dict[str, list[Behavior]]]:
    """Where recipe settings are chosen, so that the test sets choose nothing: the `size` AdvBench behaviors after
    the training ones, and benign prompts that are neither anchors nor over-refusal test prompts (XSTest's safe
    prompts halfway between the test stride's, the next JBB benign and Self-Instruct user tasks, CoCoNot contrast
    prompts between the test ones)."""
    n = preset.over_refusal_prompts
    xstest = load_behaviors("xstest-safe")
    stride = _xstest_stride(xstest, n)
    harmful = _shuffled_advbench(seed)[preset.train_behaviors:preset.train_behaviors + size]
    benign = {"xstest-safe": xstest[stride // 2::stride][: size // 2],
              "jbb-benign": load_behaviors("jbb-benign")[1::2][n // 2: n // 2 + size // 2],
              "self-instruct-user": load_behaviors("self-instruct-user")[n - n // 2: n - n // 2 + size // 2],
              "coconot-contrast": load_behaviors("coconot-contrast")[1::2][: size // 2]}
    return harmful, benign


class Reproduction:
    def __init__(self, preset_name: str, out: Path, display: Display | None = None, preset: Preset | None = None):
        self.preset = preset or PRESETS[preset_name]
        self.preset_name = preset_name
        self.out = Path(out)
        self.display = display or LineDisplay()
        self.timings: dict[str, float] = {}
        self._loaded = self._loaded_role = self._scorer = None

    @contextmanager
    def stage(self, name: str):
        """Times a stage and shows it; yields its progress callback."""
        started = time.perf_counter()
        with self.display.stage(name) as progress:
            yield progress
        self.timings[name] = round(time.perf_counter() - started, 1)

    @property
    def roles(self) -> tuple[str, ...]:
        return ("original", *self.preset.training)

    def recipe_of(self, role: str) -> str:
        return self.preset.training[role].recipe or RECIPE_OF_ROLE[role]

    def model_spec(self, role: str) -> str:
        if role == "original":
            return DEFAULT_MODEL
        return str(final_model_dir(self.out / "models" / role, self.preset.training[role].rounds))

    def run(self) -> dict:
        started = time.perf_counter()
        for module, purpose in (("accelerate", "loading the embedded model"), ("trl", "training"),
                                ("datasets", "training"), ("matplotlib", "the report")):
            require(module, purpose)  # before minutes of work, not after
        train, test = split_behaviors(self.preset)
        anchors, over_refusal = benign_sets(self.preset)
        (self.out).mkdir(parents=True, exist_ok=True)
        (self.out / "split.json").write_text(json.dumps({"train": [b.id for b in train],
                                                         "test": [b.id for b in test]}))
        controls = benign_control_behaviors(over_refusal)
        with self.stage("trajectories") as progress:
            trajectories = self.original_answers(train + test, progress)
            benign_answers = self.original_answers(controls, progress)
            benign_spans = self.original_answers(controls, progress, BENIGN_INSERT_TRAJECTORIES)
        results, probes, utility, held_out = {}, {}, {}, {}
        for role in self.roles:  # each model's stages in a row, so that it is loaded once for them
            if role != "original":
                with self.stage(f"train {role}") as progress:
                    self.train(role, train, anchors, trajectories, progress)
            with self.stage(f"evaluate {role}") as progress:
                results[role] = self.evaluate(role, test, trajectories, over_refusal, progress)
                results[role] |= self.evaluate_benign_controls(role, controls, benign_answers, benign_spans, progress)
            with self.stage(f"utility {role}") as progress:
                utility[role] = self.utility(role, self.utility_sets(over_refusal["self-instruct-user"]), progress)
            with self.stage(f"probe {role}") as progress:
                probes[role] = self.probe(role, test, trajectories, progress)
            with self.stage(f"held-out attacks {role}") as progress:
                held_out[role] = self.held_out(role, train, test, trajectories, progress)
        self._release()
        summary = {"preset": self.preset_name, "continuation_tokens": self.preset.continuation_tokens,
                   "results": results, "utility": utility, "probes": probes,
                   "held_out": held_out, "attack_matrix": self.attack_matrix(),
                   "resets": {role: self.reset_counts(role) for role in self.roles[1:]
                              if self.recipe_of(role) == "backtracking"},
                   "timings_s": self.timings, "total_s": round(time.perf_counter() - started, 1)}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        (self.out / "summary.md").write_text(summary_markdown(summary))
        with self.stage("report"):
            self.report()
        return summary

    def attack_matrix(self) -> dict[str, dict[str, dict]]:
        """Recovery per attack (trained-on and held-out) and model, on the harmful test behaviors."""
        from trajalign.attack_report import attack_matrix

        return attack_matrix([episode for path in sorted((self.out / "evals").rglob(EPISODES_FILE))
                              for episode in EpisodeLog(path.parent).load() if not is_benign(episode.dataset)])

    def reset_counts(self, role: str) -> dict[str, dict[str, int]]:
        """Per evaluation of a backtracking model, held-out attacks included: its episodes, and those with a reset
        token in the judged window. A reset counts as a refusal: a recovery on harmful prompts, a false reset on
        benign ones (Zhang et al. 2024 report both)."""
        evals = self.out / "evals" / role
        counts = {}
        for path in sorted(evals.rglob(EPISODES_FILE)):
            episodes = EpisodeLog(path.parent).load()
            counts[path.parent.relative_to(evals).as_posix()] = {"n": len(episodes),
                                                                 "resets": sum(e.reset for e in episodes)}
        return counts

    def original_answers(self, behaviors: list[Behavior], progress, source: str = ORIGINAL_TRAJECTORIES
                         ) -> dict[str, Trajectory]:
        return load_trajectories(source, behaviors, self._handle("original"), self.preset.trajectory_tokens,
                                 GENERATION_BATCH_SIZE, cache_dir=self.out / "cache", progress=progress)

    def report(self) -> None:
        from trajalign.report import build_report

        build_report([self.out], self.out / "report" / "report.html")

    def train(self, role: str, train: list[Behavior], anchors: list[Behavior], trajectories, progress=None) -> None:
        training = self.preset.training[role]
        recipe_config = RecipeConfig(name=self.recipe_of(role), benign_ratio=training.benign_ratio,
                                     benign_mix=training.benign_mix, **training.recipe_options)
        config = TrainConfig(model=DEFAULT_MODEL, recipe=recipe_config,
                             harmful=[HarmfulSource(name="advbench"), *training.harmful_sources], harmful_limit=None,
                             benign=training.anchor_sources, benign_limit=None,
                             trajectory_tokens=self.preset.trajectory_tokens, anchor_tokens=self.preset.anchor_tokens,
                             epochs=training.epochs, learning_rate=training.learning_rate or self.preset.learning_rate,
                             lora=training.lora,
                             kl_weight=training.kl_weight, preference=training.preference, rounds=training.rounds,
                             out=self.out / "models" / role)
        harmful = train + without_advbench(load_sources(training.harmful_sources))
        benign = anchors + self._held_out_checked(load_sources(training.anchor_sources))
        self._release()  # the model trained is a fresh copy; nothing else need stay resident beside it
        inputs = dict(handle=load_model(DEFAULT_MODEL), harmful=harmful, benign=benign, trajectories=trajectories,
                      cache_dir=self.out / "cache")
        if training.rounds > 1:
            run_rounds(config, attacks=RoundAttacks(depths=[depth for depth in self.preset.depths if depth > 0],
                                                    insert_after=self.preset.insert_after,
                                                    insert_length=self.preset.insert_length,
                                                    continuation_tokens=self.preset.continuation_tokens,
                                                    batch_size=GENERATION_BATCH_SIZE), **inputs)
        else:
            run_training(config, progress=progress, **inputs)
        release_memory()  # the trainer's reference cycles hold the model, its gradients and the optimizer state

    def _held_out_checked(self, anchors: list[Behavior]) -> list[Behavior]:
        """Extra anchors may not be over-refusal test or validation prompts."""
        _, evaluation = benign_sets(self.preset)
        _, validation = validation_sets(self.preset)
        held_out = {b.id for behaviors in [*evaluation.values(), *validation.values()] for b in behaviors}
        clash = next((anchor for anchor in anchors if anchor.id in held_out), None)
        if clash is not None:
            raise InputError(f"dataset '{clash.dataset}' behavior '{clash.id}': an over-refusal test or validation "
                             f"prompt cannot be a training anchor")
        return anchors

    def _eval(self, role: str, name: str, attack, behaviors: list[Behavior],
              trajectories: dict[str, Trajectory] | None, progress=None, source: str = ORIGINAL_TRAJECTORIES,
              judges: list[JudgeConfig] | None = None, ablate: AblationConfig | None = None) -> list[dict]:
        """One evaluation; its behaviors are written into its run directory, so that its config.yaml re-runs it."""
        out = self.out / "evals" / role / name
        behaviors_file = write_behaviors(out / "behaviors.jsonl", behaviors)
        config = EvalConfig(model=self.model_spec(role), dataset=str(behaviors_file), trajectories=source,
                            trajectory_tokens=self.preset.trajectory_tokens, attack=attack,
                            max_new_tokens=self.preset.continuation_tokens,
                            judge_window=self.preset.continuation_tokens, batch_size=GENERATION_BATCH_SIZE,
                            judges=judges or [JudgeConfig()], ablate=ablate, out=out)
        evaluation = Evaluation(config, handle=self._handle(role), trajectories=trajectories,
                                judges=self._built(config.judges, role))
        rows = evaluation.run(progress and (lambda done, total: progress(done, total, f"{name} episodes")))["rows"]
        release_memory()  # the freed KV caches would otherwise stay in the heap, under the next evaluation's peak
        return rows

    def _handle(self, role: str):
        """The model of `role`, loaded once while consecutive stages use it; one model is resident at a time."""
        if self._loaded_role != role:
            self._release()
            self._loaded = load_model(self.model_spec(role))
            self._loaded_role = role
        return self._loaded

    def _built(self, judges: list[JudgeConfig], role: str) -> list | None:
        """The pmi judge scores with the original model: the one already loaded while the original is evaluated,
        else a copy loaded once per model's evaluations rather than once per benign source."""
        if not any(judge.name == "pmi" for judge in judges):
            return None
        from trajalign.helpfulness import PMIJudge
        from trajalign.judges import make_judge

        if self._scorer is None:
            self._scorer = self._handle(role) if role == "original" else load_model(DEFAULT_MODEL)
        return [PMIJudge(handle=self._scorer, **judge.options) if judge.name == "pmi"
                else make_judge(judge.name, **judge.options) for judge in judges]

    def _release(self) -> None:
        self._loaded = self._loaded_role = self._scorer = None
        release_memory()

    def evaluate(self, role: str, test, trajectories, over_refusal, progress=None) -> dict:
        preset = self.preset
        rows = {HARMFUL_SWEEP: self._eval(role, HARMFUL_SWEEP, Prefill(depths=preset.depths), test, trajectories,
                                          progress),
                HARMFUL_INSERT: self._eval(role, HARMFUL_INSERT, self._insertion(), test, trajectories, progress)}
        # keyword first (its verdict is `refused`), then the pmi judge's "attempts the task" on the same answers
        helpfulness = [JudgeConfig(name="keyword"), JudgeConfig(name="pmi")]
        for name, behaviors in over_refusal.items():
            rows[name] = self._eval(role, name, Prefill(depths=[0]), behaviors, None, progress, judges=helpfulness)
        self._scorer = None
        if preset.decoding:
            rows["decoding"] = self._eval(role, "decoding", Decoding(samples=1), test, None, progress)
        return rows

    def _insertion(self) -> Insert:
        return Insert(after=[self.preset.insert_after], span_lengths=[self.preset.insert_length])

    def evaluate_benign_controls(self, role: str, controls: list[Behavior], answers: dict[str, Trajectory],
                                 spans: dict[str, Trajectory], progress=None) -> dict:
        """The harmful sweep's perturbations where the right behaviour is to carry on: the original model's own
        benign answer prefilled at the same depths, a span of another prompt's answer inserted at the same point."""
        depths = [depth for depth in self.preset.depths if depth > 0]
        return {BENIGN_SWEEP: self._eval(role, BENIGN_SWEEP, Prefill(depths=depths), controls, answers, progress),
                BENIGN_INSERT: self._eval(role, BENIGN_INSERT, self._insertion(), controls, spans, progress,
                                          source=BENIGN_INSERT_TRAJECTORIES)}

    def utility_sets(self, self_instruct: list[Behavior]) -> dict[str, list[Behavior]]:
        """The reference answers that measure utility: Dolly's evaluation part and the Self-Instruct user tasks."""
        return {"dolly-eval": load_behaviors("dolly-eval", limit=self.preset.utility_prompts),
                "self-instruct-user": self_instruct}

    def utility(self, role: str, sets: dict[str, list[Behavior]], progress=None) -> dict:
        """Per reference set: the model's per-answer NLL rows (kept in `utility/ROLE/SET.json`) and, for a trained
        model, their change against the original's."""
        from trajalign.utility import compare

        results = {}
        for name, behaviors in sets.items():
            rows = self._utility_rows(role, name, behaviors, progress)
            results[name] = {"n": len(rows), "mean_nll": sum(row["nll"] for row in rows) / len(rows)}
            if role != "original":
                results[name] |= compare(rows, self._utility_rows("original", name, behaviors, None))
        return results

    def _utility_rows(self, role: str, name: str, behaviors: list[Behavior], progress) -> list[dict]:
        from trajalign.utility import reference_nll

        path = self.out / "utility" / role / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text())
        rows = reference_nll(self._handle(role), behaviors,
                             progress=progress and (lambda done, total: progress(done, total, f"{name} answers")))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows))
        return rows

    def held_out(self, role: str, train: list[Behavior], test: list[Behavior], trajectories: dict[str, Trajectory],
                 progress=None) -> dict[str, list[dict]]:
        """The attacks no recipe trains on, each on the test behaviors, in `evals/ROLE/held-out/NAME`: random
        insertion; with the full set also foreign trajectories, the adaptive search, abliteration with the model's
        own refusal direction and, on the aligned models, fine-tuning on the training behaviors."""
        train_file = benign_sft = None
        if role != "original":
            train_file = write_behaviors(self.out / "held-out-train.jsonl", train)
            benign_sft = write_behaviors(self.out / "held-out-benign-sft.jsonl", self.benign_sft_behaviors())
        rows = {}
        for name, spec in held_out_attacks(self.preset.held_out, train_file, DEFAULT_MODEL,
                                           benign_sft=benign_sft).items():
            ablate = AblationConfig(direction=self.out / "probes" / role / "direction") if spec.ablate else None
            given = trajectories if spec.trajectories == ORIGINAL_TRAJECTORIES else None
            rows[name] = self._eval(role, f"held-out/{name}", spec.attack, test, given, progress,
                                    source=spec.trajectories, ablate=ablate)
        return rows

    def benign_sft_behaviors(self) -> list[Behavior]:
        """What the benign fine-tuning attack trains every model on: Dolly training questions with their human
        answers, the first that no model of the preset has among its anchors, so that the attack stays held out."""
        anchored = {anchor.id for training in self.preset.training.values()
                    for anchor in load_sources(training.anchor_sources)}
        return [row for row in load_behaviors("dolly-train") if row.id not in anchored][:BENIGN_SFT_ROWS]

    def probe(self, role: str, test, trajectories, progress=None) -> dict:
        from trajalign.probe.direction import RefusalDirection, steering_effect

        out = self.out / "probes" / role
        if (out / "probe.json").exists():
            return json.loads((out / "probe.json").read_text())
        handle = self._handle(role)
        config = ProbeConfig(model=self.model_spec(role), direction_prompts=self.preset.direction_prompts,
                             layer_step=self.preset.layer_step, trajectory_tokens=self.preset.trajectory_tokens,
                             eval_runs=[self.out / "evals" / role / HARMFUL_SWEEP],
                             # the between-model view: every model's states read on the original model's direction
                             reference_direction=None if role == "original" else
                             self.out / "probes" / "original" / "direction", out=out)
        results = run_probe(config, handle=handle, behaviors=test, trajectories=trajectories,
                            exclude_ids={b.id for b in test}, progress=progress)
        direction = RefusalDirection.load(out / "direction")
        harmless = [b.prompt for b in load_behaviors("jbb-benign")[1::2][:self.preset.steering_prompts]]
        results["steering"] = steering_effect(handle, direction, [b.prompt for b in test], harmless,
                                              new_tokens=self.preset.continuation_tokens,
                                              batch_size=GENERATION_BATCH_SIZE, progress=progress)
        (out / "probe.json").write_text(json.dumps(results, indent=2))
        return results


def headline_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    """The console's table, one row per model: both sides of depth at their worst (as the frontier figure plots
    them) and the utility change; summary.md and the report hold every cell."""
    header = ["model", "refuse @0", "lowest recovery (k ≥ 1, insertion)", "highest false break (benign controls)",
              "highest over-refusal (source)", "Dolly NLL change"]
    rows = []
    for h in from_summary(summary):
        utility = h.utility.get("dolly-eval", {})
        rows.append([h.model, str(h.recovery.get(0, "–")), str(h.worst_recovery or "–"),
                     str(h.worst_false_break or "–"), str(h.worst_over_refusal or "–"),
                     f"{utility['relative_change_pct']:+.1f}%" if "relative_change_pct" in utility else "–"])
    return header, rows


def _probe_lines(role: str, probe: dict) -> list[str]:
    from trajalign.report import within_depth_table

    steering = probe.get("steering", {})
    lines = [f"**{role}** refusal direction at layer {probe['direction']['layer']}: refusal on test harmful "
             f"{steering.get('harmful_refusal', float('nan')):.0%} -> "
             f"{steering.get('harmful_refusal_ablated', float('nan')):.0%} when ablated; on harmless "
             f"{steering.get('harmless_refusal', float('nan')):.0%} -> "
             f"{steering.get('harmless_refusal_added', float('nan')):.0%} when added.", ""]
    rows = [{"model": role, **row} for within in probe.get("within_depth", {}).values() for row in within]
    if rows:
        headers, cells = within_depth_table(rows)
        lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
                  *["| " + " | ".join(row) + " |" for row in cells], ""]
    return lines


def attack_lines(matrix: dict) -> list[str]:
    from trajalign.attack_report import matrix_table

    if not matrix:
        return []
    header, rows = matrix_table(matrix)
    return ["## Attacks x models", "",
            "Recovery on the harmful test behaviors per attack: the trained-on perturbations (prefill of the original "
            "model's greedy answer, the insertion after 8 own tokens) beside the held-out ones no recipe trains on. "
            "Wilson 95% intervals.", "",
            "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(cells) + " |" for cells in rows], ""]


def _reset_lines(resets: dict[str, dict[str, dict[str, int]]]) -> list[str]:
    lines = ["## Backtracking resets", ""] if resets else []
    for role, counts in resets.items():
        lines += [f"**{role}**: answers with a reset token in the judged window, per evaluation (counted as refusals "
                  "above: recoveries on harmful prompts, false resets on benign ones; Wilson 95% intervals).", "",
                  "| evaluation | resets |", "|---|---|"]
        for name, count in counts.items():
            low, high = wilson_interval(count["resets"], count["n"])
            lines.append(f"| {name} | {count['resets'] / count['n']:.0%} [{low:.0%}, {high:.0%}] "
                         f"({count['resets']}/{count['n']}) |")
        lines.append("")
    return lines


def summary_markdown(summary: dict) -> str:
    text = [f"# trajalign reproduce --preset {summary['preset']}", "",
            f"Keyword judge (a refusal beginning within {summary['continuation_tokens']} continuation tokens), "
            "Wilson 95% intervals; held-out behaviors and prompts only.", "", *markdown(from_summary(summary)), "",
            *attack_lines(summary.get("attack_matrix", {})),
            "## Claim (b): do internal scores predict recovery at a fixed depth?", "",
            "Per model: the refusal direction's effect, then the mean within-depth AUROC of each score (depths "
            "k ≥ 1 with both outcomes present), beside the pooled AUROC over k ≥ 1, where depth itself predicts both "
            "score and recovery, and depth 0 apart. The within-depth column answers the claim.", ""]
    for role, probe in summary["probes"].items():
        text += _probe_lines(role, probe)
    text += _reset_lines(summary.get("resets", {}))
    text.append("Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in summary["timings_s"].items())
                + f"; total {summary['total_s']:.0f} s.")
    return "\n".join(text) + "\n"


def reproduce(preset: str = "quick", out: Path = Path("runs/reproduce"), display: Display | None = None) -> dict:
    """Run the study of `preset` into `out` (resuming it); `display` shows its stages (default: a line each)."""
    return Reproduction(preset, out, display).run()
