import copy
import json
import math
import re

import pytest
import torch

from trajalign.testing import labelled_cross_entropy, save_tiny_model
from trajalign.train.losses import ConstrainedSettings
from trajalign.train.objectives import Objective, PrefixConstrained, objective_for
from trajalign.train.recipes import IGNORE, RECIPES, RecipeConfig, RowBuilder, TrainingRow, build_rows
from trajalign.train.trainer import TrainConfig, run_training

TRAJECTORY = list(range(300, 340))


def test_every_recipe_is_listed_by_the_cli(cli):
    code, out, _ = cli("train", "--help")
    assert code == 0
    text = re.sub(r"[\s│]+", " ", out)
    assert all(name in text for name in RECIPES)
    assert {"prefix-constrained", "circuit-breaker", "refusal-ablation", "backtracking"} <= set(RECIPES)
    assert type(objective_for("rto")) is Objective and type(objective_for("trajectory")) is Objective


def test_prefix_constrained_is_prefix_augmentation_with_the_constrained_loss(tiny):
    config = PrefixConstrained().configure(TrainConfig(recipe=RecipeConfig(name="prefix-constrained")))
    assert config.constrained == ConstrainedSettings()
    chosen = ConstrainedSettings(beta_first=1.0)
    assert PrefixConstrained().configure(TrainConfig(constrained=chosen)).constrained == chosen
    harmful = [(f"h{i}", f"Question number {i}", TRAJECTORY * 3) for i in range(200)]
    rows = build_rows(RecipeConfig(name="prefix-constrained", benign_ratio=0), tiny.chat, harmful, [])
    builder = RowBuilder(tiny.chat)
    prefixes = []
    for row in rows:
        trained_from = next(index for index, label in enumerate(row.labels) if label != IGNORE)
        prefixes.append(trained_from - len(tiny.chat.prompt_ids(f"Question number {row.behavior_id[1:]}")))
        answer = builder.recoveries if row.kind == "prefix" else builder.refusals
        assert row.input_ids[trained_from:-1] in answer and row.input_ids[-1] == builder.end[0]
    assert {row.kind for row in rows} == {"prefix", "refusal"}
    assert 70 <= sum(row.kind == "prefix" for row in rows) <= 130  # half, as in the paper
    assert all(1 <= k <= 100 for row, k in zip(rows, prefixes) if row.kind == "prefix") and max(prefixes) > 90
    assert all(k == 0 for row, k in zip(rows, prefixes) if row.kind == "refusal")


def trained_tokens(rows):
    return [[index for index, label in enumerate(row.labels[1:]) if label != IGNORE] for row in rows]


def tiny_run(tmp_path, recipe: str, **fields):
    save_tiny_model(tmp_path / "base")
    config = TrainConfig(model=str(tmp_path / "base"), recipe=RecipeConfig(name=recipe, benign_ratio=0.5),
                         harmful_limit=8, benign=["jbb-benign"], benign_limit=4, trajectories="target",
                         trajectory_tokens=12, anchor_tokens=8, batch_size=12, learning_rate=3e-3, epochs=2,
                         out=tmp_path / "model", **fields)
    from trajalign.models import load_model

    initial = copy.deepcopy(load_model(config.model).model)
    run_training(config)
    rows = [TrainingRow(**json.loads(line)) for line in (config.out / "rows.jsonl").read_text().splitlines()]
    log = [entry for entry in json.loads((config.out / "training_log.json").read_text()) if "loss" in entry]
    return initial, rows, log


def test_prefix_constrained_first_step_loss_is_the_constrained_loss_at_the_reference(tmp_path):
    _, rows, log = tiny_run(tmp_path, "prefix-constrained")
    # At step 0 the policy is its reference: every trained token costs (2 / beta_t) log 2, beta_t by its index.
    settings = ConstrainedSettings()
    costs = [2 / settings.betas(torch.tensor([index + 1])).item() * math.log(2)
             for tokens in trained_tokens(rows) for index in range(len(tokens))]
    assert len(log) == 2 and log[0]["loss"] == pytest.approx(sum(costs) / len(costs), rel=1e-4)


def test_rto_rows_label_a_refusal_opening_after_every_prefix_and_train_plain_cross_entropy(tmp_path, tiny):
    harmful = [(f"h{i}", f"Question number {i}", TRAJECTORY) for i in range(6)]
    rows = build_rows(RecipeConfig(name="rto", benign_ratio=0), tiny.chat, harmful, [])
    builder = RowBuilder(tiny.chat)
    for row in rows:
        start = len(tiny.chat.prompt_ids(f"Question number {row.behavior_id[1:]}"))
        end = start + len(TRAJECTORY)
        assert row.kind == "rto" and row.input_ids[start:end] == TRAJECTORY
        assert row.labels[:start] == [IGNORE] * start
        assert row.labels[start] in {ids[0] for ids in builder.refusals}  # the answer's first token
        assert all(label in builder.openings for label in row.labels[start + 1:end])
        assert row.labels[end:] == row.input_ids[end:] and row.input_ids[end:-1] in builder.recoveries
    initial, rows, log = tiny_run(tmp_path, "rto")
    assert {row.kind for row in rows} == {"rto", "anchor"}
    assert len(log) == 2 and log[0]["loss"] == pytest.approx(labelled_cross_entropy(initial, rows), rel=1e-4)


def test_comparator_settings_that_cannot_work_are_one_line_errors(tmp_path, tiny):
    from trajalign.errors import InputError
    from trajalign.testing import tiny_handle

    with pytest.raises(InputError, match="lora.merge"):
        objective_for("backtracking").configure(TrainConfig(recipe=RecipeConfig(name="backtracking"),
                                                            lora={"merge": False}))
    rerouting = objective_for("circuit-breaker")
    recipe = RecipeConfig(name="circuit-breaker", rerouting={"layers": [1, 7]})
    with pytest.raises(InputError, match="recipe.rerouting.layers: block 7 is outside the model's 2 decoder blocks"):
        rerouting.prepare_model(tiny_handle(), rerouting.configure(TrainConfig(recipe=recipe)))
    with pytest.raises(InputError, match="harmless prompts"):
        objective_for("refusal-ablation").build_rows(RecipeConfig(name="refusal-ablation"), tiny.chat,
                                                     [("h", "Question", TRAJECTORY)], [])
