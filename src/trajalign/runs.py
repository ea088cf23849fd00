"""Run directories: config.yaml, manifest.json (what the run ran on), an append-only resumable episodes.jsonl,
and summary.json."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from trajalign.errors import InputError, where
from trajalign.records import Episode
from trajalign.stats import wilson_interval

EPISODES_FILE = "episodes.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"


class EpisodeLog:
    """Episodes appended a batch at a time, flushed and fsynced, so a killed run loses at most one batch.

    A line cut short by a kill is dropped on the next open (it was never acknowledged); any other bad line is
    an error, since it means the file was edited or corrupted.
    """

    def __init__(self, directory: Path):
        self.path = Path(directory) / EPISODES_FILE

    def load(self) -> list[Episode]:
        if not self.path.exists():
            return []
        raw = self.path.read_bytes()
        complete = raw[: raw.rfind(b"\n") + 1]
        if len(complete) != len(raw):
            with open(self.path, "r+b") as handle:
                handle.truncate(len(complete))
        episodes = []
        for number, line in enumerate(complete.decode("utf-8").splitlines(), 1):
            try:
                episodes.append(Episode.model_validate_json(line))
            except ValidationError as error:
                raise InputError(f"{where(self.path, number)}: not an episode record ({error.errors()[0]['msg']})") \
                    from None
        return episodes

    def append(self, episodes: list[Episode]) -> None:
        if not episodes:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write("".join(episode.model_dump_json() + "\n" for episode in episodes))
            handle.flush()
            os.fsync(handle.fileno())


def _as_read_now(config: BaseModel, settings: dict) -> dict:
    """Settings as this version reads them: a field added since they were written takes its default."""
    try:
        return json.loads(type(config).model_validate({**settings, "out": config.out}).model_dump_json(
            exclude={"out"}))
    except ValidationError:
        return settings


def write_config(directory: Path, config: BaseModel, added_fields_take_defaults: bool = False) -> None:
    """Write the run's config; refuse to resume a directory that holds a different one.

    `added_fields_take_defaults` lets a directory written before a field existed resume, when the field's default
    is the value asked for. Only for directories whose outputs no setting names: an evaluation's episode ids hash
    its attack's settings, so a resumed one would generate its episodes again beside the old ones."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CONFIG_FILE
    current = json.loads(config.model_dump_json(exclude={"out"}))
    if path.exists():
        previous = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if added_fields_take_defaults:
            previous, current = _as_read_now(config, previous), _as_read_now(config, current)
        if previous != current:
            changed = sorted(key for key in set(previous) | set(current) if previous.get(key) != current.get(key))
            raise InputError(f"{path}: this run directory holds a different config (differs in: "
                             f"{', '.join(changed)}); choose another --out")
        return
    path.write_text(yaml.safe_dump(current, sort_keys=False), encoding="utf-8")


def pin_in_manifest(directory: Path, name: str, value, what: str) -> None:
    """Record `value` under `name` in the run's manifest; refuse to resume a directory that ran on another."""
    path = Path(directory) / MANIFEST_FILE
    manifest = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    if name in manifest:
        if manifest[name] != value:
            raise InputError(f"{path}: this run directory ran on other {what} ({name} differs); choose another --out")
        return
    manifest[name] = value
    partial = path.with_suffix(f".{os.getpid()}.tmp")  # written whole and renamed: a kill never leaves half a file
    partial.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    os.replace(partial, path)


def _position_order(episode: Episode) -> tuple:
    return (episode.depth if episode.depth is not None else -1, episode.position.label)


def summarize(episodes: list[Episode]) -> list[dict]:
    """Per model x attack x defense x ablation x trajectory source x position: n, refusal rate (recovery on
    harmful prompts, over-refusal on benign ones) and attack success rate, with Wilson 95% CIs."""
    groups: dict[tuple, list[Episode]] = defaultdict(list)
    for episode in sorted(episodes, key=lambda e: (e.model, e.attack_kind, e.defense or "", e.ablation or "",
                                                   e.trajectory_source or "", _position_order(e))):
        groups[(episode.model, episode.attack_kind, episode.defense, episode.ablation, episode.trajectory_source,
                episode.position.label)].append(episode)
    rows = []
    for (model, attack, defense, ablation, trajectory_source, position), members in groups.items():
        refusals = _refusals(members)
        n, failed = refusals["n"], refusals["n"] - refusals["refused"]
        refused_answer = sum(episode.verdicts["keyword"].refused_answer for episode in members
                             if "keyword" in episode.verdicts)
        rows.append({
            "model": model, "attack": attack, "defense": defense, "ablation": ablation,
            "trajectories": trajectory_source, "position": position,
            "depth": members[0].depth if attack == "prefill" else None, **refusals,
            "attack_success_rate": failed / n, "attack_success_ci95": wilson_interval(failed, n),
            "refused_answer_rate": refused_answer / n,
            **_attempts(members), **_by_dataset(members),
        })
    return rows


def _by_dataset(members: list[Episode]) -> dict:
    """Where one run mixes prompt sources (everyday benign = JailbreakBench benign + Self-Instruct), each
    source's own refusal rate: a pooled rate can hide that one source carries it."""
    by_dataset: dict[str, list[Episode]] = defaultdict(list)
    for episode in members:
        by_dataset[episode.dataset].append(episode)
    if len(by_dataset) < 2:
        return {}
    return {"by_dataset": {name: _refusals(episodes) for name, episodes in sorted(by_dataset.items())}}


def _attempts(members: list[Episode]) -> dict:
    """Answers that attempt the task, where a judge says so (the pmi judge on benign prompts); absent otherwise."""
    said = [next((verdict.attempts_task for verdict in episode.verdicts.values()
                  if verdict.attempts_task is not None), None) for episode in members]
    if any(value is None for value in said):
        return {}
    attempted = sum(said)
    return {"attempts_task": attempted, "attempts_task_rate": attempted / len(members),
            "attempts_task_ci95": wilson_interval(attempted, len(members))}


def _refusals(episodes: list[Episode]) -> dict:
    refused = sum(episode.refused for episode in episodes)
    return {"n": len(episodes), "refused": refused, "refusal_rate": refused / len(episodes),
            "refusal_ci95": wilson_interval(refused, len(episodes))}


def write_summary(directory: Path, episodes: list[Episode], extra: dict | None = None) -> dict:
    summary = {"rows": summarize(episodes), "episodes": len(episodes), **(extra or {})}
    (Path(directory) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
