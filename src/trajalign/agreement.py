"""Judges checked against hand labels: gold labels matched to run episodes, agreement and Cohen's kappa per stratum.

A gold file is JSONL, one labelled episode a line (`GoldLabel`), kept beside the rubric it was labelled by
(`gold/RUBRIC.md`). Each judge is scored twice: from the verdicts stored in the episodes (what the run reported)
and re-run now on the same episodes, its inputs rebuilt as the evaluation built them (the prompt, the decoded
assistant prefix, the continuation's first `judge_window` tokens decoded with the run's tokenizer).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from trajalign.data.datasets import is_benign
from trajalign.errors import InputError, where
from trajalign.evaluate import JudgeConfig
from trajalign.judges import episode_judge_input, make_judge
from trajalign.records import Episode, Verdict
from trajalign.runs import CONFIG_FILE, EPISODES_FILE, EpisodeLog
from trajalign.stats import bootstrap_interval, cohen_kappa, wilson_interval

Split = Literal["dev", "test", "all"]
LABELS = ("refused", "attempts_task")


class GoldLabel(BaseModel):
    """One hand-labelled episode."""

    model_config = ConfigDict(extra="forbid")
    episode_id: str
    run: str = Field(description="the run directory (or source) the episode was drawn from")
    split: Literal["dev", "test"] = Field(description="dev: may tune judges; test: only ever reported")
    stratum: str = Field(description="e.g. 'trajectory / prefill' or 'shallow / coconot-contrast'")
    refused: bool = Field(description="a refusal begins in the continuation's judged window")
    attempts_task: bool | None = Field(default=None, description="benign prompts: the answer attempts the task")
    incoherent: bool | None = Field(default=None, description="the continuation relates to nothing in the conversation")
    note: str = Field(default="", description="the labeller's note")
    _row: int = PrivateAttr(default=0)  # where it stands in its file, for error messages


class AgreementConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gold: Path
    runs: list[Path]
    split: Split = "all"
    judges: list[JudgeConfig] = Field(default_factory=list, description="judges to re-run beside the runs' own")
    resamples: int = Field(default=1000, gt=0, description="bootstrap resamples for kappa's interval")
    out: Path = Path("runs/judge-agreement")


def load_gold(path: Path) -> list[GoldLabel]:
    if not Path(path).is_file():
        raise InputError(f"{path}: gold label file not found")
    labels, seen = [], {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            label = GoldLabel.model_validate_json(line)
        except ValidationError as error:
            first = error.errors()[0]
            field = ".".join(str(part) for part in first["loc"]) or None
            raise InputError(f"{where(path, number, field)}: {first['msg']}") from None
        if label.episode_id in seen:
            raise InputError(f"{where(path, number, 'episode_id')}: episode '{label.episode_id}' labelled twice "
                             f"(first at row {seen[label.episode_id]})")
        seen[label.episode_id] = number
        label._row = number
        labels.append(label)
    if not labels:
        raise InputError(f"{path}: no gold labels")
    return labels


@dataclass
class RunEpisode:
    episode: Episode
    run: Path  # the directory holding its episodes.jsonl and config.yaml


def run_episodes(runs: list[Path]) -> dict[str, list[RunEpisode]]:
    """Every episode under the given run directories, by episode id."""
    by_id: dict[str, list[RunEpisode]] = defaultdict(list)
    for run in runs:
        files = sorted(Path(run).rglob(EPISODES_FILE)) if Path(run).is_dir() else []
        if not files:
            raise InputError(f"{run}: no {EPISODES_FILE} in this run directory or below it")
        for file in files:
            for episode in EpisodeLog(file.parent).load():
                by_id[episode.episode_id].append(RunEpisode(episode, file.parent))
    return by_id


def match(gold: list[GoldLabel], by_id: dict[str, list[RunEpisode]], gold_path: Path) -> list[RunEpisode]:
    """The episode of each gold label; the label's `run` picks among copies of one episode in several runs."""
    matched = []
    for label in gold:
        candidates = by_id.get(label.episode_id, [])
        if len(candidates) > 1:
            suffix = label.run.rstrip("/")
            candidates = [c for c in candidates if c.run.as_posix().endswith(suffix)]
        if len(candidates) != 1:
            problem = "not found in the given runs" if not candidates else "in several runs, none named by 'run'"
            raise InputError(f"{where(gold_path, label._row, 'episode_id')}: episode '{label.episode_id}' {problem}")
        matched.append(candidates[0])
    return matched


def run_settings(run: Path) -> dict:
    """model, judge_window and judges of the run that wrote the episodes (read from its config.yaml)."""
    path = run / CONFIG_FILE
    if not path.is_file():
        raise InputError(f"{path}: missing; the judges cannot be re-run without the run's config")
    config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if "model" not in config:
        raise InputError(f"{path} field 'model': missing")
    return {"model": config["model"], "judge_window": int(config.get("judge_window", 24)),
            "judges": config.get("judges") or [{"name": "keyword", "options": {}}]}


def rerun_verdicts(matched: list[RunEpisode], extra_judges: list[JudgeConfig],
                   load_handle=None) -> dict[str, list[Verdict]]:
    """Judge name -> a verdict per matched episode, every judge of every run (and the keyword judge and
    `extra_judges`) re-run now on inputs rebuilt from the episodes."""
    if load_handle is None:
        from trajalign.models.loading import load_model as load_handle
    settings = {run: run_settings(run) for run in {item.run for item in matched}}
    handles = {}
    inputs = []
    for item in matched:
        model = settings[item.run]["model"]
        if model not in handles:
            handles[model] = load_handle(model)
        inputs.append(episode_judge_input(item.episode, handles[model].chat.decode, settings[item.run]["judge_window"]))
    specs = [{"name": "keyword", "options": {}}, *(judge.model_dump() for judge in extra_judges),
             *(judge for run in settings.values() for judge in run["judges"])]
    unique = {json.dumps([spec["name"], spec.get("options", {})], sort_keys=True): spec for spec in specs}
    verdicts = {}
    for spec in unique.values():
        if spec["name"] in verdicts:
            raise InputError(f"judge '{spec['name']}': given with different options in different runs; compare "
                             f"them in separate judge-agreement calls")
        verdicts[spec["name"]] = make_judge(spec["name"], **spec.get("options", {})).judge(inputs)
    return verdicts


def agreement_row(judged: list[bool], gold: list[bool], resamples: int = 1000, seed: int = 0) -> dict:
    """Raw agreement (Wilson 95% interval) and Cohen's kappa (bootstrap 95% interval, items resampled)."""
    judged_array, gold_array = np.asarray(judged, dtype=bool), np.asarray(gold, dtype=bool)
    agree = int((judged_array == gold_array).sum())
    n = len(gold_array)
    return {"n": n, "agree": agree, "agreement": agree / n, "agreement_ci95": wilson_interval(agree, n),
            "kappa": cohen_kappa(judged_array, gold_array),
            "kappa_ci95": bootstrap_interval(cohen_kappa, [judged_array, gold_array], resamples, seed),
            "judge_yes": int(judged_array.sum()), "gold_yes": int(gold_array.sum()),
            "both_yes": int((judged_array & gold_array).sum())}


def agreement_rows(gold: list[GoldLabel], verdicts: dict[str, list[Verdict | None]], source: str,
                   resamples: int = 1000) -> list[dict]:
    """Per judge x label x stratum (and 'all'), over the items both the judge and the labeller gave that label."""
    rows = []
    for judge, judge_verdicts in sorted(verdicts.items()):
        for label in LABELS:
            by_stratum: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
            for item, verdict in zip(gold, judge_verdicts):
                judged = None if verdict is None else (
                    verdict.refused_continuation if label == "refused" else verdict.attempts_task)
                truth = getattr(item, label)
                if judged is None or truth is None:
                    continue
                for stratum in (item.stratum, "all"):
                    by_stratum[stratum][0].append(judged)
                    by_stratum[stratum][1].append(truth)
            for stratum in sorted(by_stratum, key=lambda name: (name == "all", name)):
                judged, truth = by_stratum[stratum]
                rows.append({"source": source, "judge": judge, "label": label, "stratum": stratum,
                             **agreement_row(judged, truth, resamples)})
    return rows


def judge_agreement(config: AgreementConfig, load_handle=None) -> dict:
    """Match, score stored and re-run verdicts, write agreement.json and agreement.md under `config.out`."""
    gold = [label for label in load_gold(config.gold) if config.split in ("all", label.split)]
    if not gold:
        raise InputError(f"{config.gold}: no labels in split '{config.split}'")
    matched = match(gold, run_episodes(config.runs), config.gold)
    stored_names = sorted({name for item in matched for name in item.episode.verdicts})
    stored = {name: [item.episode.verdicts.get(name) for item in matched] for name in stored_names}
    rerun = rerun_verdicts(matched, config.judges, load_handle)
    rows = (agreement_rows(gold, stored, "stored", config.resamples)
            + agreement_rows(gold, rerun, "rerun", config.resamples))
    result = {"gold": str(config.gold), "gold_sha256": hashlib.sha256(config.gold.read_bytes()).hexdigest(),
              "split": config.split, "items": len(gold), "runs": [str(run) for run in config.runs], "rows": rows,
              "labelled": labelled_items(gold, matched, {"stored": stored, "rerun": rerun})}
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / "agreement.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    (config.out / "agreement.md").write_text(agreement_markdown(result), encoding="utf-8")
    return result


def labelled_items(gold: list[GoldLabel], matched: list[RunEpisode],
                   verdicts: dict[str, dict[str, list[Verdict | None]]]) -> list[dict]:
    """Per item: the labels beside every verdict, to read the disagreements and calibrate a threshold on the
    development half."""
    items = []
    for index, (label, item) in enumerate(zip(gold, matched)):
        judged = {f"{source}:{name}": values[index].model_dump(exclude_none=True)
                  for source, by_name in verdicts.items() for name, values in by_name.items()
                  if values[index] is not None}
        items.append({**label.model_dump(), "run_dir": str(item.run), "verdicts": judged})
    return items


def agreement_markdown(result: dict) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = [f"Judge agreement with {result['items']} gold labels ({result['split']} split) of {result['gold']}.",
             "stored = verdicts the runs recorded; rerun = the judges run now on the same episodes. Agreement: Wilson "
             "95% CI; kappa: bootstrap 95% CI (items resampled).", "",
             "| source | judge | label | stratum | n | agreement | 95% CI | kappa | 95% CI | judge yes | gold yes |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        low, high = row["agreement_ci95"]
        kappa_low, kappa_high = row["kappa_ci95"]
        lines.append(f"| {row['source']} | {cell(row['judge'])} | {row['label']} | {cell(row['stratum'])} | "
                     f"{row['n']} | {row['agree']}/{row['n']} ({row['agreement']:.0%}) | {low:.0%}–{high:.0%} | "
                     f"{row['kappa']:.2f} | {kappa_low:.2f}–{kappa_high:.2f} | {row['judge_yes']} | "
                     f"{row['gold_yes']} |")
    return "\n".join(lines) + "\n"


class GoldDraw(BaseModel):
    """A stratified draw of episodes to hand-label: `per_stratum` from every run directory under `runs` (a
    stratum is a run directory's path below its root, e.g. `evals/shallow/insert`), each stratum split half dev,
    half test at random before anyone labels."""

    model_config = ConfigDict(extra="forbid")
    runs: list[Path]
    per_stratum: int = Field(default=10, gt=1)
    judge_window: int = Field(default=24, gt=0, description="continuation tokens the labeller reads")
    seed: int = 0
    out: Path = Path("gold")


def draw_gold(config: GoldDraw, load_tokenizer=None) -> tuple[Path, Path]:
    """Write `items.jsonl` (the blind view labellers read: prompt, the assistant turn with injected text marked,
    the judged window of the continuation; no verdict, model or run name) and `key.jsonl` (item -> episode, run,
    stratum, split; never shown to labellers). Returns both paths."""
    import random

    if load_tokenizer is None:
        from trajalign.models.loading import load_tokenizer
    rng = random.Random(config.seed)
    drawn = []
    for root in config.runs:
        for file in sorted(Path(root).rglob(EPISODES_FILE)):
            episodes = EpisodeLog(file.parent).load()
            chosen = rng.sample(episodes, min(config.per_stratum, len(episodes)))
            halves = (["dev", "test"] * len(chosen))[:len(chosen)]
            rng.shuffle(halves)
            # an evaluation directory given itself is named by its last two parts (e.g. trajectory/benign-insert)
            base = Path(root).parent.parent if file.parent == Path(root) else root
            stratum = file.parent.relative_to(base).as_posix()
            drawn += [(episode, file.parent, stratum, split) for episode, split in zip(chosen, halves)]
    if not drawn:
        raise InputError(f"{', '.join(map(str, config.runs))}: no {EPISODES_FILE} to draw from")
    rng.shuffle(drawn)  # labellers read items in an order that reveals no stratum
    tokenizers = {}
    items, key = [], []
    for number, (episode, run, stratum, split) in enumerate(drawn, 1):
        if episode.model not in tokenizers:
            tokenizers[episode.model] = load_tokenizer(run_settings(run)["model"]).chat.decode
        decode = tokenizers[episode.model]
        item_id = f"item-{number:04d}"
        items.append({"item": item_id, "request": episode.prompt, "benign": is_benign(episode.dataset),
                      "assistant_so_far": marked_prefix(episode, decode),
                      "continuation": decode(episode.continuation_ids[:config.judge_window])})
        key.append({"item": item_id, "episode_id": episode.episode_id, "run": str(run), "stratum": stratum,
                    "split": split})
    config.out.mkdir(parents=True, exist_ok=True)
    paths = config.out / "items.jsonl", config.out / "key.jsonl"
    for path, rows in zip(paths, (items, key)):
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return paths


def marked_prefix(episode: Episode, decode) -> str:
    """The assistant turn before the continuation, injected tokens between [INJECTED] and [/INJECTED]."""
    pieces, cursor = [], episode.answer_start
    for start, end in sorted(episode.injected_spans):
        pieces += [decode(episode.context_ids[cursor:start]), "[INJECTED]", decode(episode.context_ids[start:end]),
                   "[/INJECTED]"]
        cursor = end
    pieces.append(decode(episode.context_ids[cursor:]))
    return "".join(pieces)
