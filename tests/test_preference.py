"""The preference stage: pairs built token-exactly from trajectories and anchors, and DPO through TRL on them."""

import json
import math

import pytest
import torch

from trajalign.testing import save_tiny_model, tiny_handle
from trajalign.train.preference import PreferenceSettings, build_pairs, train_preference
from trajalign.train.recipes import MAX_OWN_TOKENS, RecipeConfig, RowBuilder
from trajalign.train.trainer import DONE_MARKER, TrainConfig, run_training

CHAT = tiny_handle().chat
BUILDER = RowBuilder(CHAT)
TRAJECTORIES = {f"h{i}": list(range(300 + i, 320 + 2 * i)) for i in range(12)}
HARMFUL = [(behavior_id, f"Question {behavior_id}", ids) for behavior_id, ids in TRAJECTORIES.items()]
ANSWERS = {f"b{i}": (list(range(200 + i, 206 + i)), i % 2 == 0) for i in range(5)}
BENIGN = [(behavior_id, f"Write a poem {behavior_id}", ids, finished) for behavior_id, (ids, finished) in
          ANSWERS.items()]


def test_pairs_are_the_trajectories_and_answers_token_for_token():
    settings = PreferenceSettings(pairs_per_behavior=3, insertion_share=0.5)
    recipe = RecipeConfig(max_span=5, max_prefix=100)
    pairs = build_pairs(settings, recipe, CHAT, HARMFUL, BENIGN)
    assert len(pairs) == 3 * (len(HARMFUL) + len(BENIGN))
    kinds = {pair.kind for pair in pairs}
    assert kinds == {"harmful-prefix", "harmful-insertion", "benign"}
    recoveries = [recovery + BUILDER.end for recovery in BUILDER.recoveries]
    for pair in pairs:
        if pair.kind == "benign":
            answer, finished = ANSWERS[pair.behavior_id]
            assert pair.prompt_ids == CHAT.prompt_ids(f"Write a poem {pair.behavior_id}")
            assert pair.chosen_ids == answer + (BUILDER.end if finished else [])
            assert pair.rejected_ids in [refusal + BUILDER.end for refusal in BUILDER.refusals]
            continue
        trajectory = TRAJECTORIES[pair.behavior_id]
        prompt = CHAT.prompt_ids(f"Question {pair.behavior_id}")
        assert pair.prompt_ids[:len(prompt)] == prompt and pair.chosen_ids in recoveries
        context = pair.prompt_ids[len(prompt):]
        assert pair.rejected_ids and trajectory[-len(pair.rejected_ids):] == pair.rejected_ids
        inserted_end = len(trajectory) - len(pair.rejected_ids)  # the trajectory continues where the context ends
        if pair.kind == "harmful-prefix":
            assert context == trajectory[:inserted_end]
        else:  # some refusal opening of j tokens, then a span of 1..max_span trajectory tokens ending there
            openings = [j for j in range(1, MAX_OWN_TOKENS + 1) if 1 <= len(context) - j <= recipe.max_span
                        and any(context[:j] == refusal[:j] for refusal in BUILDER.refusals)
                        and context[j:] == trajectory[inserted_end - (len(context) - j):inserted_end]]
            assert openings


def test_pairs_are_seeded_and_skip_trajectories_with_nothing_to_reject():
    settings = PreferenceSettings()
    first = build_pairs(settings, RecipeConfig(), CHAT, HARMFUL + [("short", "Question", [300])], BENIGN)
    again = build_pairs(settings, RecipeConfig(), CHAT, HARMFUL + [("short", "Question", [300])], BENIGN)
    assert [pair.model_dump() for pair in first] == [pair.model_dump() for pair in again]
    assert "short" not in {pair.behavior_id for pair in first}


def _sequence_log_prob(model, prompt: list[int], completion: list[int]) -> float:
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    return log_probs[len(prompt) - 1:].gather(-1, targets[len(prompt) - 1:].unsqueeze(-1)).sum().item()


def test_dpo_trains_on_the_pairs_ids_and_prefers_chosen(tmp_path):
    handle = tiny_handle(seed=1)
    pairs = build_pairs(PreferenceSettings(pairs_per_behavior=2), RecipeConfig(), CHAT, HARMFUL, BENIGN)
    margins = [_sequence_log_prob(handle.model, p.prompt_ids, p.chosen_ids)
               - _sequence_log_prob(handle.model, p.prompt_ids, p.rejected_ids) for p in pairs]
    trainer = train_preference(PreferenceSettings(epochs=4, learning_rate=3e-3, beta=0.5), handle.model.train(),
                               handle.tokenizer, pairs, tmp_path / "dpo", batch_size=8, seed=0, on_gpu=False,
                               bf16=False)
    stored = trainer.train_dataset
    assert stored.column_names == ["prompt_ids", "chosen_ids", "rejected_ids"]
    assert [(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) for row in stored] == [
        (p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs]
    batch = trainer.data_collator([stored[0], stored[1]])
    for index, pair in enumerate(pairs[:2]):  # chosen rows first, then rejected ones, right-padded
        chosen = pair.prompt_ids + pair.chosen_ids
        rejected = pair.prompt_ids + pair.rejected_ids
        assert batch["input_ids"][index, :len(chosen)].tolist() == chosen
        assert batch["input_ids"][2 + index, :len(rejected)].tolist() == rejected
        assert batch["completion_mask"][index].sum().item() == len(pair.chosen_ids)
    model = trainer.model.eval()
    after = [_sequence_log_prob(model, p.prompt_ids, p.chosen_ids)
             - _sequence_log_prob(model, p.prompt_ids, p.rejected_ids) for p in pairs]
    assert sum(a > b for a, b in zip(after, margins)) >= 0.9 * len(pairs)


def test_preference_stage_runs_on_the_sft_model_with_it_as_reference(tmp_path):
    save_tiny_model(tmp_path / "base")
    config = TrainConfig(model=str(tmp_path / "base"), harmful_limit=16, benign=["jbb-benign"], benign_limit=8,
                         trajectories="target", trajectory_tokens=12, anchor_tokens=8, batch_size=8, epochs=1,
                         learning_rate=3e-3, recipe=RecipeConfig(benign_ratio=0.5),
                         preference=PreferenceSettings(pairs_per_behavior=1), out=tmp_path / "model")
    run_training(config)
    sft = tmp_path / "model" / "sft"
    assert (sft / DONE_MARKER).exists() and (sft / "rows.jsonl").exists()
    marker = json.loads((config.out / DONE_MARKER).read_text())
    pairs = (config.out / "pairs.jsonl").read_text().splitlines()
    assert marker["pairs"] == len(pairs) == 16 + 8
    log = json.loads((config.out / "training_log.json").read_text())
    # policy == reference on the first batch: every pair's DPO loss is -log sigmoid(0)
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    from safetensors.torch import load_file

    trained, before = load_file(config.out / "model.safetensors"), load_file(sft / "model.safetensors")
    assert any(not torch.equal(trained[name], before[name]) for name in before)
    assert not (config.out / "checkpoints").exists()
