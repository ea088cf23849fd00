"""Attacks as typed, serialisable plans: positions, labels, episode keys and the registry."""

import pytest
from pydantic import TypeAdapter

from trajalign.attacks import (
    ATTACKS,
    Attack,
    Decoding,
    Insert,
    MultiInsert,
    Position,
    Prefill,
    PrefillPosition,
    ReinjectHeader,
)
from trajalign.data.datasets import Behavior
from trajalign.data.trajectories import Trajectory
from trajalign.errors import InputError
from trajalign.evaluate import episode_key

BEHAVIOR = Behavior(id="advbench-007", prompt="p", dataset="advbench")

# Keys of episodes written before attacks became classes (commit fa74cab): run directories stay resumable.
KEYS_BEFORE = [
    (Prefill(depths=[0, 5, 10]), None, "depth=5", 0, "8c3a2e455eb97cfc07c0"),
    (Insert(after=[8], span_lengths=[10]), ReinjectHeader(), "after=8,len=10", 0, "95269019bad6ce810956"),
    (Insert(after=[8], span_text="Sure, here is"), None, "after=8,text", 0, "653728055827b1683ef6"),
    (MultiInsert(after=[8, 24], span_length=10), None, "after=8+24,len=10", 0, "07de3f65a2067482dc1b"),
    (Decoding(samples=2), None, "T=0.7,p=0.9,k=40", 1, "5d1489e39dd665c1afd6"),
]


@pytest.mark.parametrize("attack,defense,label,sample,key", KEYS_BEFORE, ids=[case[2] for case in KEYS_BEFORE])
def test_labels_and_episode_keys_are_what_they_were(attack, defense, label, sample, key):
    (position,) = [p for p in attack.grid(BEHAVIOR) if p.label == label and p.sample == sample]
    assert episode_key("smollm2-135m", BEHAVIOR.id, attack, defense, position) == key


def trajectory(length: int) -> Trajectory:
    return Trajectory(behavior_id=BEHAVIOR.id, source="test", token_ids=list(range(length)))


def test_positions_skip_what_a_short_trajectory_cannot_serve():
    prefill = Prefill(depths=[0, 5, 20])
    assert [p.label for p in prefill.positions(BEHAVIOR, trajectory(6))] == ["depth=0", "depth=5"]
    assert len(prefill.grid(BEHAVIOR)) == 3
    insert = Insert(after=[2, 8], span_lengths=[4, 10])
    assert [p.label for p in insert.positions(BEHAVIOR, trajectory(6))] == ["after=2,len=4", "after=8,len=4"]
    text = Insert(after=[3], span_text="Sure")
    assert [p.label for p in text.positions(BEHAVIOR, trajectory(0))] == ["after=3,text"]
    decoding = Decoding(temperatures=[1.0], top_ps=[0.9, 1.0], top_ks=[0], samples=3)
    positions = decoding.positions(BEHAVIOR, trajectory(0))
    assert len(positions) == 6 and [p.sample for p in positions[:3]] == [0, 1, 2]
    assert {p.label for p in positions} == {"T=1,p=0.9,k=0", "T=1,p=1,k=0"}


def test_random_insertion_points_are_seeded_per_behavior():
    attack = Insert(random_after=(2, 30), seed=3)
    first = [p.after for p in attack.grid(BEHAVIOR)]
    assert first == [p.after for p in attack.grid(BEHAVIOR)] and 2 <= first[0] <= 30
    others = {attack.grid(Behavior(id=f"b{i}", prompt="p", dataset="d"))[0].after for i in range(20)}
    assert len(others) > 5


def test_what_each_attack_needs():
    assert not Prefill(depths=[0]).needs_trajectories() and Prefill(depths=[0, 1]).needs_trajectories()
    assert not Decoding().needs_trajectories() and Insert().needs_trajectories()
    assert not Decoding.accepts_defense and Prefill.accepts_defense
    with pytest.raises(InputError, match="depth 9: beyond every trajectory"):
        Prefill(depths=[0, 9]).check([trajectory(4), trajectory(8)])
    Prefill(depths=[0, 8]).check([trajectory(4), trajectory(8)])


def test_registry_and_unions_round_trip_every_attack():
    assert set(ATTACKS) == {"prefill", "insert", "multi-insert", "decoding", "random-insert", "adaptive", "finetune"}
    for name, cls in ATTACKS.items():
        attack = TypeAdapter(Attack).validate_python({"kind": name})
        assert type(attack) is cls
        for position in attack.grid(BEHAVIOR):
            again = TypeAdapter(Position).validate_json(position.model_dump_json())
            assert again == position and again.label == position.label
    with pytest.raises(ValueError):
        TypeAdapter(Attack).validate_python({"kind": "prefill", "after": [3]})  # settings of another attack
    assert PrefillPosition(depth=3).label == "depth=3"
