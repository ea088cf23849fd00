"""On-policy rounds: the failures found by attacking a round's model become exactly the rows added to the next."""

import json
import random
from collections import Counter

from trajalign.attacks import Insert, InsertPosition, Prefill, PrefillPosition
from trajalign.records import Episode
from trajalign.runs import EpisodeLog
from trajalign.testing import save_tiny_model, tiny_handle
from trajalign.train.anchors import Anchor
from trajalign.train.iteration import RoundAttacks, anchor_rows, recovery_rows, run_rounds
from trajalign.train.recipes import IGNORE, RecipeConfig, RowBuilder
from trajalign.train.trainer import DONE_MARKER, Materials, TrainConfig

CHAT = tiny_handle().chat
BUILDER = RowBuilder(CHAT)


def episode(behavior_id: str, prompt: str, assistant: list[int], continuation: list[int], refused: bool,
            kind: str = "prefill") -> Episode:
    context = CHAT.prompt_ids(prompt) + assistant
    attack, position = ((Prefill(depths=[5]), PrefillPosition(depth=5)) if kind == "prefill"
                        else (Insert(after=[1], span_lengths=[2]), InsertPosition(after=1, length=2)))
    return Episode(episode_id=behavior_id + kind, model="m", behavior_id=behavior_id, dataset="d", prompt=prompt,
                   attack=attack, position=position, depth=len(assistant), context_ids=context,
                   answer_start=len(context) - len(assistant), continuation_ids=continuation,
                   continuation_text="", finish_reason="length", exact_ids=True, refused=refused)


def labelled(row) -> list[int]:
    return [label for label in row.labels if label != IGNORE]


def test_unrecovered_harmful_contexts_become_recovery_rows_after_the_models_own_continuation():
    episodes = [episode("h1", "Question one", [300, 301, 302], [310, 311], refused=False),
                episode("h2", "Question two", [303, 304], [312], refused=True),
                episode("h3", "Question three", [305], [313, 314, 315], refused=False, kind="insert")]
    rows = recovery_rows(episodes, BUILDER, random.Random(0))
    assert [row.behavior_id for row in rows] == ["h1", "h3"]
    for row, source in zip(rows, [episodes[0], episodes[2]]):
        untrained = source.context_ids + source.continuation_ids
        assert row.input_ids[:len(untrained)] == untrained and row.kind == "on-policy-recovery"
        assert row.labels[:len(untrained)] == [IGNORE] * len(untrained)
        assert labelled(row) == row.input_ids[len(untrained):]
        assert labelled(row) in [recovery + BUILDER.end for recovery in BUILDER.recoveries]


def test_refused_benign_prompts_become_anchor_rows_with_the_anchor_answer():
    from trajalign.data.datasets import Behavior

    anchors = [Anchor(Behavior(id=f"b{i}", prompt=f"Write a poem {i}", dataset="d"), [200 + i, 201], i == 0)
               for i in range(3)]
    episodes = [episode(f"b{i}", f"Write a poem {i}", [], [250], refused=i != 1) for i in range(3)]
    rows = anchor_rows(episodes, Materials([], anchors), BUILDER)
    assert [row.behavior_id for row in rows] == ["b0", "b2"]
    assert rows[0].input_ids == CHAT.prompt_ids("Write a poem 0") + [200, 201] + BUILDER.end
    assert labelled(rows[0]) == [200, 201] + BUILDER.end and labelled(rows[1]) == [202, 201]
    assert {row.kind for row in rows} == {"on-policy-anchor"}


def test_rounds_add_exactly_the_failures_they_found_and_resume(tmp_path):
    save_tiny_model(tmp_path / "base")
    config = TrainConfig(model=str(tmp_path / "base"), harmful_limit=10, benign=["jbb-benign"], benign_limit=6,
                         trajectories="target", trajectory_tokens=12, anchor_tokens=8, batch_size=8, epochs=1,
                         learning_rate=3e-3, recipe=RecipeConfig(benign_ratio=0.6), rounds=2, out=tmp_path / "run")
    attacks = RoundAttacks(depths=[5, 10, 500], continuation_tokens=8, batch_size=16)
    directories = run_rounds(config, attacks=attacks)
    assert directories == [tmp_path / "run" / "round-1", tmp_path / "run" / "round-2"]
    assert all((directory / DONE_MARKER).exists() for directory in directories)
    first, second = directories

    failures = json.loads((first / "failures.json").read_text())
    episodes = {name: EpisodeLog(first / "attacks" / name).load() for name in ("prefill", "insert", "benign")}
    trained_ids = {f"advbench-{i:03d}" for i in range(10)}
    assert {e.behavior_id for name in ("prefill", "insert") for e in episodes[name]} == trained_ids
    assert {e.depth for e in episodes["prefill"]} == {5, 10}  # no trajectory reaches depth 500
    assert {e.behavior_id for e in episodes["benign"]} == {f"jbb-benign-{i:03d}" for i in range(6)}
    for name in ("prefill", "insert"):
        failed = sorted((e for e in episodes[name] if not e.refused), key=lambda e: (e.behavior_id, e.position.label))
        assert len(failures[name]) == len(failed)
        for row, failure in zip(failures[name], failed):
            untrained = failure.context_ids + failure.continuation_ids
            assert row["input_ids"][:len(untrained)] == untrained and row["behavior_id"] == failure.behavior_id
    refused = sorted(e.behavior_id for e in episodes["benign"] if e.refused)
    assert [row["behavior_id"] for row in failures["benign"]] == refused
    added = [row for rows in failures.values() for row in rows]
    assert added, "the tiny model fails some attacks"

    def rows_of(directory):
        return Counter(json.dumps([row["input_ids"], row["labels"]])
                       for row in map(json.loads, (directory / "rows.jsonl").read_text().splitlines()))

    assert rows_of(second) - rows_of(first) == Counter(json.dumps([row["input_ids"], row["labels"]]) for row in added)
    assert not rows_of(first) - rows_of(second)
    record = json.loads((tmp_path / "run" / "rounds.json").read_text())
    assert record == [{"round": 1, "model": str(first), "failure_rows_trained": 0,
                       "failures_found": {name: len(rows) for name, rows in failures.items()}},
                      {"round": 2, "model": str(second), "failure_rows_trained": len(added)}]

    weights = (second / "model.safetensors").stat().st_mtime_ns
    assert run_rounds(config, attacks=attacks) == directories
    assert (second / "model.safetensors").stat().st_mtime_ns == weights
    assert json.loads((tmp_path / "run" / "rounds.json").read_text()) == record
