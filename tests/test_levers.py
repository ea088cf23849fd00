"""Training levers: anchor sources and answers, benign perturbation rows, benign likelihood anchoring, several
harmful sources (the preference stage and on-policy rounds have their own test files)."""

import json
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trajalign.data.datasets import load_behaviors
from trajalign.data.trajectories import Trajectory, generate_answers
from trajalign.errors import InputError
from trajalign.testing import tiny_handle
from trajalign.train import anchoring
from trajalign.train.anchoring import anchoring_loss, benign_kl
from trajalign.train.anchors import build_anchors
from trajalign.train.recipes import BENIGN_KINDS, IGNORE, MAX_OWN_TOKENS, RecipeConfig, RowBuilder, build_rows
from trajalign.train.sources import AnchorSource, load_sources
from trajalign.train.trainer import TrainConfig, load_benign, load_harmful, prepare_materials, run_training

HANDLE = tiny_handle()
CHAT = HANDLE.chat
BUILDER = RowBuilder(CHAT)
PROMPT = CHAT.prompt_ids("Explain photosynthesis")
ANSWER = list(range(300, 330))


def trained(row):
    return [(index, label) for index, label in enumerate(row.labels) if label != IGNORE]


# Lever 1: anchors from several sources, self-distilled or the dataset's own answers


def test_sources_take_limits_and_several_datasets():
    config = TrainConfig(harmful="advbench:3", benign=["jbb-benign:2", {"name": "self-instruct-seed", "limit": 4,
                                                                         "weight": 3, "answers": "reference"}],
                         benign_limit=None)
    assert [(s.name, s.limit) for s in config.harmful] == [("advbench", 3)]
    assert [(s.name, s.limit, s.weight, s.answers) for s in config.benign] == [
        ("jbb-benign", 2, 1.0, None), ("self-instruct-seed", 4, 3.0, "reference")]
    benign = load_benign(config)
    assert [b.id for b in benign] == ([b.id for b in load_behaviors("jbb-benign")[:2]]
                                      + [b.id for b in load_behaviors("self-instruct-seed")[:4]])
    assert len(load_benign(config.model_copy(update={"benign_limit": 3}))) == 3


def test_sources_refuse_evaluation_only_data_and_shared_ids():
    with pytest.raises(InputError, match="'self-instruct-user'.*evaluation only"):
        load_sources([AnchorSource(name="self-instruct-user")])
    with pytest.raises(InputError, match="behavior 'jbb-benign-000' field 'id': also in 'jbb-benign'"):
        load_sources([AnchorSource.model_validate("jbb-benign:1"), AnchorSource.model_validate("jbb-benign:2")])


def test_reference_answers_are_the_datasets_tokens_cut_to_length():
    seed_tasks = load_behaviors("self-instruct-seed")[148:156]  # short answers and long ones
    anchors = build_anchors(HANDLE, seed_tasks, [], "reference", max_tokens=3, batch_size=8, cache_dir=None)
    for anchor, behavior in zip(anchors, seed_tasks):
        ids = HANDLE.tokenizer(behavior.reference, add_special_tokens=False)["input_ids"]
        assert anchor.answer == ids[:3] and anchor.finished == (len(ids) <= 3)
    assert {anchor.finished for anchor in anchors} == {True, False}


def test_each_source_answers_its_own_way():
    jbb = load_behaviors("jbb-benign")[:3]
    seed_tasks = load_behaviors("self-instruct-seed")[:3]
    sources = [AnchorSource(name="self-instruct-seed", answers="reference", weight=2)]
    anchors = build_anchors(HANDLE, jbb + seed_tasks, sources, "self", max_tokens=8, batch_size=8, cache_dir=None)
    distilled = generate_answers(HANDLE, jbb, 8)
    assert [anchor.answer for anchor in anchors[:3]] == [distilled[b.id] for b in jbb]
    assert [anchor.weight for anchor in anchors] == [1, 1, 1, 2, 2, 2]
    assert anchors[3].answer == HANDLE.tokenizer(seed_tasks[0].reference, add_special_tokens=False)["input_ids"][:8]
    with pytest.raises(InputError, match="dataset 'jbb-benign' behavior 'jbb-benign-000' field 'reference'"):
        build_anchors(HANDLE, jbb, [], "reference", max_tokens=8, batch_size=8, cache_dir=None)


def test_anchor_rows_follow_their_weights():
    harmful = [(f"h{i}", f"Question {i}", ANSWER) for i in range(40)]
    benign = [(f"b{i}", f"Write a poem {i}", [300 + i, 301], True) for i in range(4)]
    rows = build_rows(RecipeConfig(name="refusal-sft", benign_ratio=1.0), CHAT, harmful, benign, weights=[3, 1, 1, 1])
    counts = Counter(row.behavior_id for row in rows if row.kind == "anchor")
    assert counts["b0"] == 20 and sorted(counts[f"b{i}"] for i in (1, 2, 3)) == [6, 7, 7]
    equal = build_rows(RecipeConfig(name="refusal-sft", benign_ratio=1.0), CHAT, harmful, benign, weights=[2] * 4)
    plain = build_rows(RecipeConfig(name="refusal-sft", benign_ratio=1.0), CHAT, harmful, benign)
    assert [row.input_ids for row in equal] == [row.input_ids for row in plain]


# Lever 2: benign answers perturbed the way harmful ones are, trained to continue


@given(k=st.integers(1, 29), finished=st.booleans())
@settings(max_examples=40, deadline=None)
def test_benign_prefix_trains_exactly_the_rest_of_the_answer(k, finished):
    row = BUILDER.benign_prefix(PROMPT, ANSWER, finished, k, "b")
    tail = ANSWER[k:] + (BUILDER.end if finished else [])
    assert row.input_ids == PROMPT + ANSWER + (BUILDER.end if finished else [])
    assert trained(row) == list(zip(range(len(PROMPT) + k, len(row.input_ids)), tail))
    assert row.kind in BENIGN_KINDS


@given(j=st.integers(1, 8), start=st.integers(0, 20), length=st.integers(1, 10))
@settings(max_examples=40, deadline=None)
def test_benign_insertion_trains_exactly_the_own_answer_after_the_span(j, start, length):
    foreign = list(range(200, 240))
    span = foreign[start:start + length]
    row = BUILDER.benign_insertion(PROMPT, ANSWER, True, j, span, "b")
    context = PROMPT + ANSWER[:j] + span
    assert row.input_ids == context + ANSWER[j:] + BUILDER.end
    assert trained(row) == list(zip(range(len(context), len(row.input_ids)), ANSWER[j:] + BUILDER.end))
    assert row.kind in BENIGN_KINDS


def test_benign_mix_draws_perturbations_as_harmful_rows_are_drawn():
    answers = {f"b{i}": list(range(100 + 40 * i, 100 + 40 * i + 10 + i)) for i in range(8)}
    benign = [(behavior_id, f"Write a poem {behavior_id}", ids, True) for behavior_id, ids in answers.items()]
    harmful = [(f"h{i}", f"Question {i}", ANSWER) for i in range(200)]
    config = RecipeConfig(name="trajectory", benign_ratio=1.0, max_span=6,
                          benign_mix={"plain": 0.5, "prefix": 0.25, "insertion": 0.25})
    rows = [row for row in build_rows(config, CHAT, harmful, benign) if row.kind in BENIGN_KINDS]
    kinds = Counter(row.kind for row in rows)
    assert len(rows) == 200 and 60 <= kinds["anchor"] <= 140 and kinds["benign-prefix"] >= 25
    assert kinds["benign-insertion"] >= 25
    for row in rows:
        answer = answers[row.behavior_id]
        prompt = CHAT.prompt_ids(f"Write a poem {row.behavior_id}")
        start = trained(row)[0][0]
        assert row.input_ids[:len(prompt)] == prompt and row.input_ids[-1] == BUILDER.end[0]
        own = len(answer) - (len(row.input_ids) - start - 1)  # own tokens written before the trained tail
        assert row.input_ids[start:-1] == answer[own:]
        if row.kind == "anchor":
            assert own == 0
        elif row.kind == "benign-prefix":
            assert 1 <= own < len(answer) and row.input_ids[len(prompt):start] == answer[:own]
        else:
            assert 1 <= own <= MAX_OWN_TOKENS and row.input_ids[len(prompt):len(prompt) + own] == answer[:own]
            span = row.input_ids[len(prompt) + own:start]
            assert 1 <= len(span) <= 6
            assert any(_contains(other, span) for other_id, other in answers.items() if other_id != row.behavior_id)


def _contains(sequence: list[int], span: list[int]) -> bool:
    return any(sequence[index:index + len(span)] == span for index in range(len(sequence) - len(span) + 1))


# Lever 3: KL to the frozen original on benign rows


def test_benign_kl_is_zero_when_the_model_is_the_reference():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 11)
    targets = torch.tensor([[5, 6, IGNORE, IGNORE], [1, 2, 3, 4], [7, IGNORE, IGNORE, IGNORE]])
    assert benign_kl(logits, logits.clone(), targets, torch.tensor([True, True, False])).item() == pytest.approx(0)


def test_benign_kl_matches_a_hand_computation():
    import math

    p_reference = [[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]]
    p_model = [[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]]
    reference = torch.log(torch.tensor(p_reference)).reshape(1, 2, 3)
    policy = torch.log(torch.tensor(p_model)).reshape(1, 2, 3)
    expected = sum(sum(p * math.log(p / q) for p, q in zip(ps, qs)) for ps, qs in zip(p_reference, p_model)) / 2
    value = benign_kl(policy, reference, torch.tensor([[0, 2]]), torch.tensor([True]))
    assert value.item() == pytest.approx(expected, rel=1e-5)
    harmful_row_too = benign_kl(torch.cat([policy, policy.flip(-1)]), torch.cat([reference, reference]),
                                torch.tensor([[0, 2], [1, 1]]), torch.tensor([True, False]))
    assert harmful_row_too.item() == pytest.approx(expected, rel=1e-5)
    only_first = benign_kl(policy, reference, torch.tensor([[0, IGNORE]]), torch.tensor([True]))
    assert only_first.item() == pytest.approx(sum(p * math.log(p / q) for p, q in zip(p_reference[0], p_model[0])))


def _toy_batch():
    rows = [CHAT.prompt_ids("Write a poem") + [300, 301, 302], CHAT.prompt_ids("Explain photosynthesis") + [310]]
    width = max(map(len, rows))
    input_ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    attention = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    labels = torch.full_like(input_ids, IGNORE)
    labels[0, len(rows[0]) - 3:len(rows[0])] = input_ids[0, len(rows[0]) - 3:len(rows[0])]
    labels[1, len(rows[1]) - 1] = 310
    from trajalign.train.losses import trained_positions

    positions, targets = trained_positions(labels)
    return {"input_ids": input_ids, "attention_mask": attention, "use_cache": False,
            "logits_to_keep": positions}, targets


def test_the_reference_gets_no_gradient():
    import copy

    model = tiny_handle().model.train()
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    forward, targets = _toy_batch()
    assert anchoring_loss(model, reference, forward, model(**forward).logits, targets,
                          torch.tensor([True, True])).item() == pytest.approx(0, abs=1e-6)
    weight = model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        weight.add_(0.05 * torch.randn_like(weight))
    loss = anchoring_loss(model, reference, forward, model(**forward).logits, targets, torch.tensor([True, False]))
    assert loss.item() > 0
    loss.backward()
    assert all(parameter.grad is None for parameter in reference.parameters())
    assert weight.grad.abs().sum() > 0


def test_with_lora_the_reference_is_the_model_with_its_adapter_disabled():
    from peft import LoraConfig, get_peft_model

    base = tiny_handle().model
    forward, targets = _toy_batch()
    with torch.no_grad():
        original = base(**forward).logits
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    torch.testing.assert_close(anchoring.reference_logits(model, None, forward), original)
    loss = anchoring_loss(model, None, forward, model(**forward).logits, targets, torch.tensor([True, True]))
    loss.backward()
    assert loss.item() > 0
    assert all(parameter.grad is None for name, parameter in model.named_parameters() if "lora" not in name)
    assert any(parameter.grad.abs().sum() > 0 for name, parameter in model.named_parameters() if "lora" in name)


def test_training_passes_the_trainer_which_rows_are_benign(tmp_path, monkeypatch):
    from trajalign.train import trainer

    seen = []

    def recording(model, reference, forward, logits, targets, benign_rows):
        seen.extend((ids[mask.bool()].tolist(), bool(flag)) for ids, mask, flag in
                    zip(forward["input_ids"], forward["attention_mask"], benign_rows))
        return anchoring_loss(model, reference, forward, logits, targets, benign_rows)

    monkeypatch.setattr(trainer, "anchoring_loss", recording)
    config = TrainConfig(model="tiny", harmful_limit=12, benign=["self-instruct-seed"], benign_limit=12,
                         trajectories="target", trajectory_tokens=12, anchor_tokens=8, batch_size=8, epochs=1,
                         kl_weight=0.5, recipe=RecipeConfig(benign_ratio=1.0, benign_mix={"plain": 1, "prefix": 1}),
                         out=tmp_path / "model")
    run_training(config, handle=tiny_handle())
    rows = [json.loads(line) for line in (config.out / "rows.jsonl").read_text().splitlines()]
    benign_of = {tuple(row["input_ids"]): row["kind"] in BENIGN_KINDS for row in rows}
    assert len(seen) == len(rows) == 24 and "benign-prefix" in {row["kind"] for row in rows}
    assert all(benign_of[tuple(ids)] == flag for ids, flag in seen)
    assert sum(flag for _, flag in seen) == 12


# Lever 5: several harmful sources, trajectories from the original model for each


def test_several_harmful_sources_each_get_the_original_models_trajectories(tmp_path):
    config = TrainConfig(harmful=["advbench:3", "jbb-harmful"], harmful_limit=2, benign=[],
                         trajectories=f"model:{HANDLE.spec}", trajectory_tokens=6)
    harmful = load_harmful(config)
    assert [b.dataset for b in harmful] == ["advbench"] * 3 + ["jbb-harmful"] * 2
    materials = prepare_materials(config, HANDLE, harmful, [], tmp_path)
    greedy = generate_answers(HANDLE, harmful, 6)
    assert [(behavior_id, ids) for behavior_id, _, ids in materials.harmful] == [(b.id, greedy[b.id])
                                                                                  for b in harmful]
    given = Trajectory(behavior_id=harmful[0].id, source="given", token_ids=[300, 301])
    again = prepare_materials(config, HANDLE, harmful, [], tmp_path, {given.behavior_id: given})
    assert again.harmful[0][2] == [300, 301] and again.harmful[1:] == materials.harmful[1:]

