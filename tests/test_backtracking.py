import copy
import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from trajalign.errors import InputError
from trajalign.judges import KeywordJudge
from trajalign.reset_token import reset_token_id, reset_view, split_at_reset
from trajalign.testing import labelled_cross_entropy, save_tiny_model, tiny_handle
from trajalign.train.backtracking import Backtracking, add_reset_token, backtracking_row
from trajalign.train.recipes import IGNORE, RecipeConfig, RowBuilder, TrainingRow
from trajalign.train.trainer import TrainConfig, run_training

HANDLE = tiny_handle()
RESET = add_reset_token(HANDLE.tokenizer, "[RESET]")
BUILDER = RowBuilder(HANDLE.chat)
PROMPT = HANDLE.chat.prompt_ids("Explain photosynthesis")
TRAJECTORY = list(range(300, 340))


@given(k=st.integers(0, 40), seed=st.integers(0, 10**6))
@settings(max_examples=60, deadline=None)
def test_labels_cover_exactly_reset_and_refusal(k, seed):
    row = backtracking_row(BUILDER, RESET, PROMPT, TRAJECTORY[:k], random.Random(seed), "b")
    start = len(PROMPT) + k
    assert row.input_ids[:start] == PROMPT + TRAJECTORY[:k]
    assert row.labels[:start] == [IGNORE] * start
    assert row.labels[start:] == row.input_ids[start:]
    assert row.input_ids[start] == RESET and row.input_ids[-1] == BUILDER.end[0]
    assert row.input_ids[start + 1:-1] in BUILDER.refusals


def test_rows_reset_after_a_harmful_prefix_or_at_the_start():
    handle = tiny_handle()
    recipe = RecipeConfig(name="backtracking", benign_ratio=0.5)
    harmful = [(f"h{i}", f"Question number {i}", TRAJECTORY) for i in range(40)]
    rows = Backtracking().build_rows(recipe, handle.chat, harmful, [("b0", "Write a poem", [300, 301], True)])
    reset = reset_token_id(handle.tokenizer)
    prefixes = [row.input_ids.index(reset) - len(handle.chat.prompt_ids(f"Question number {row.behavior_id[1:]}"))
                for row in rows if row.kind == "backtrack"]
    assert len(prefixes) == 40 and 0 in prefixes and max(prefixes) > 0
    assert all(0 <= k <= len(TRAJECTORY) for k in prefixes)
    assert [row.kind for row in rows].count("anchor") == 20
    assert all(reset not in row.input_ids for row in rows if row.kind == "anchor")


def test_the_user_sees_only_what_follows_the_last_reset():
    harmful, refusal = [300, 301, 302], [7, 8, 9]
    assert split_at_reset(harmful + [RESET] + refusal, RESET) == (True, refusal)
    assert split_at_reset([RESET] + harmful + [RESET] + refusal, RESET) == (True, refusal)
    assert split_at_reset(harmful, RESET) == (False, harmful)
    assert split_at_reset(harmful, None) == (False, harmful)
    view = reset_view(harmful + [RESET] + refusal, RESET, judge_window=24)
    assert view.reset_in_window and view.visible_ids == refusal
    late = reset_view(harmful * 10 + [RESET] + refusal, RESET, judge_window=24)
    assert not late.reset_in_window and late.visible_ids == harmful * 10 + [RESET] + refusal


def test_evaluation_judges_what_follows_a_reset_and_counts_the_reset_as_refused(tmp_path):
    from trajalign.attacks import Prefill, PrefillPosition
    from trajalign.evaluate import EvalConfig, Evaluation
    from trajalign.judges import episode_judge_input
    from trajalign.records import Episode

    complying = HANDLE.tokenizer("Sure, here is how", add_special_tokens=False)["input_ids"]
    answer = HANDLE.tokenizer(" Paris is the capital.", add_special_tokens=False)["input_ids"]

    def episode(continuation: list[int]) -> Episode:
        return Episode(episode_id=str(len(continuation)), model="m", behavior_id="b", dataset="advbench",
                       prompt="p", attack=Prefill(depths=[0]), position=PrefillPosition(depth=0), depth=0,
                       context_ids=PROMPT, answer_start=len(PROMPT), continuation_ids=continuation,
                       continuation_text="", finish_reason="eos", exact_ids=True, refused=False)

    reset_then_answer, plain = episode(complying + [RESET] + answer), episode(complying + answer)
    seen = episode_judge_input(reset_then_answer, HANDLE.chat.decode, 24, RESET).continuation_text
    assert "Sure" not in seen and "Paris" in seen
    evaluation = Evaluation(EvalConfig(model="tiny", out=tmp_path / "run"), handle=HANDLE)
    evaluation._judge([reset_then_answer, plain], [KeywordJudge()])
    assert reset_then_answer.reset and reset_then_answer.refused
    assert not reset_then_answer.verdicts["keyword"].refused_continuation  # the judge read only the visible answer
    assert not plain.reset and not plain.refused


def reset_handle():
    """A tiny model whose tokenizer has the reset token and whose embeddings have its row."""
    handle = tiny_handle()
    reset = add_reset_token(handle.tokenizer, "[RESET]")
    handle.model.resize_token_embeddings(len(handle.tokenizer))
    return handle, reset


def reset_bias_config(out, bias: float):
    from trajalign.attacks import Prefill
    from trajalign.evaluate import EvalConfig

    return EvalConfig(model="tiny", dataset="advbench", limit=3, trajectories="target", attack=Prefill(depths=[0, 2]),
                      max_new_tokens=6, reset_logit_bias=bias, out=out)


def test_the_reset_logit_bias_of_an_evaluation_reaches_every_step(tmp_path):
    from trajalign.evaluate import Evaluation
    from trajalign.runs import EpisodeLog

    handle, reset = reset_handle()
    config = reset_bias_config(tmp_path / "run", 100.0)
    Evaluation(config, handle=handle).run()
    episodes = EpisodeLog(config.out).load()
    assert len(episodes) == 6
    assert all(e.continuation_ids == [reset] * 6 and e.reset and e.refused for e in episodes)
    assert "reset_logit_bias: 100.0" in (config.out / "config.yaml").read_text()


def test_a_config_without_a_reset_bias_reads_as_one_written_before_the_field_existed(tmp_path):
    from trajalign.evaluate import Evaluation

    config = reset_bias_config(tmp_path / "run", 0.0)
    Evaluation(config, handle=tiny_handle()).run()
    assert "reset_logit_bias" not in (config.out / "config.yaml").read_text()  # so that old directories resume


def test_a_reset_logit_bias_for_a_model_without_the_reset_token_is_refused_before_anything_is_written(tmp_path):
    from trajalign.evaluate import EvalConfig, Evaluation

    config = EvalConfig(model="tiny", dataset="advbench", limit=2, trajectories="target", reset_logit_bias=-2.0,
                        out=tmp_path / "run")
    with pytest.raises(InputError, match="reset_logit_bias: model 'tiny' has no \\[RESET\\] token"):
        Evaluation(config, handle=tiny_handle()).run()
    assert not config.out.exists()


@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8}])
def test_only_the_reset_row_of_the_frozen_embeddings_learns(tmp_path, lora):
    from trajalign.models import load_model

    save_tiny_model(tmp_path / "base")
    handle = load_model(str(tmp_path / "base"))
    reset = add_reset_token(handle.tokenizer, "[RESET]")  # given room and a known row, to see what training does
    handle.model.resize_token_embeddings(len(handle.tokenizer))
    embeddings = handle.model.get_input_embeddings().weight
    with torch.no_grad():
        embeddings[reset] = embeddings[:reset].mean(0)
    before = embeddings.detach().clone()
    initial = copy.deepcopy(handle.model)
    config = TrainConfig(model=str(tmp_path / "base"), recipe=RecipeConfig(name="backtracking", benign_ratio=1.0),
                         harmful_limit=8, benign=["jbb-benign"], benign_limit=8, trajectories="target",
                         trajectory_tokens=12, anchor_tokens=8, batch_size=16, learning_rate=1e-2, epochs=2,
                         lora=lora, out=tmp_path / "model")
    run_training(config, handle=handle)
    rows = [TrainingRow(**json.loads(line)) for line in (config.out / "rows.jsonl").read_text().splitlines()]
    log = [entry for entry in json.loads((config.out / "training_log.json").read_text()) if "loss" in entry]
    assert len(log) == 2 and log[0]["loss"] == pytest.approx(labelled_cross_entropy(initial, rows), rel=1e-4)
    assert sum(reset in row.input_ids for row in rows) == 8
    loaded = load_model(str(config.out))
    assert reset_token_id(loaded.tokenizer) == reset == 400
    after = load_file(config.out / "model.safetensors")["model.embed_tokens.weight"]
    assert after.shape == before.shape and torch.equal(after[:reset], before[:reset])
    assert (after[reset] - before[reset]).abs().max() > 1e-4
    assert torch.equal(loaded.model.get_output_embeddings().weight[reset], after[reset])  # tied: it emits it too


def test_a_model_that_only_added_the_reset_token_takes_its_originals_trajectories(tmp_path):
    from trajalign.data.datasets import load_behaviors
    from trajalign.data.trajectories import load_trajectories
    from trajalign.models import load_model
    from trajalign.testing import save_tiny_model

    original = save_tiny_model(tmp_path / "original")
    target = load_model(str(save_tiny_model(tmp_path / "backtracking")))
    add_reset_token(target.tokenizer, "[RESET]")
    target.model.resize_token_embeddings(len(target.tokenizer))
    behaviors = load_behaviors("advbench", limit=2)
    injected = load_trajectories(f"model:{original}", behaviors, target, max_tokens=6)
    own = load_trajectories(f"model:{original}", behaviors, load_model(str(original)), max_tokens=6)
    assert {key: t.token_ids for key, t in injected.items()} == {key: t.token_ids for key, t in own.items()}


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_the_reset_row_learns_at_its_own_multiple_of_the_learning_rate(tmp_path, scale):
    """Adam's first step moves every weight with a gradient by about the learning rate: the reset row by its
    scaled rate, the other trained weights by the config's."""
    from trajalign.models import load_model

    save_tiny_model(tmp_path / "base")
    handle = load_model(str(tmp_path / "base"))
    reset = add_reset_token(handle.tokenizer, "[RESET]")
    handle.model.resize_token_embeddings(len(handle.tokenizer))
    before = copy.deepcopy(handle.model)
    recipe = RecipeConfig(name="backtracking", benign_ratio=1.0, backtracking={"token_learning_rate_scale": scale})
    config = TrainConfig(model=str(tmp_path / "base"), recipe=recipe, harmful_limit=8, benign=["jbb-benign"],
                         benign_limit=8, trajectories="target", trajectory_tokens=12, anchor_tokens=8, batch_size=16,
                         learning_rate=1e-3, epochs=1, out=tmp_path / "model")
    run_training(config, handle=handle)
    after = load_model(str(config.out)).model
    moved_row = after.get_input_embeddings().weight[reset] - before.get_input_embeddings().weight[reset]
    assert moved_row.abs().max().item() == pytest.approx(1e-3 * scale, rel=0.05)
    block_moves = [(new - old).abs().max().item() for (name, new), old in
                   zip(after.named_parameters(), before.parameters()) if "layers.0.mlp" in name]
    assert block_moves and max(block_moves) == pytest.approx(1e-3, rel=0.05)
