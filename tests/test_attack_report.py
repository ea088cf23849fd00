"""The attacks x models table, the budget-success curve and recovery against fine-tuning steps."""

from pathlib import Path

import pytest

from trajalign.attack_report import attack_matrix, attack_row, budget_curves, source_name, steps_curves
from trajalign.attacks import (
    Adaptive,
    AdaptivePosition,
    Finetune,
    FinetunePosition,
    Prefill,
    PrefillPosition,
    RandomInsert,
    RandomInsertPosition,
)
from trajalign.attacks.held_out import held_out_attacks
from trajalign.evaluate import EvalConfig
from trajalign.records import Episode
from trajalign.report import build_report
from trajalign.runs import EpisodeLog
from trajalign.stats import wilson_interval


def episode(model, attack, position, refused, index=0, source="model:smollm2-135m", ablation=None, depth=None):
    return Episode(episode_id=f"{model}-{attack.kind}-{position.label}-{index}-{source}-{ablation}", model=model,
                   behavior_id=f"b{index}", dataset="advbench", prompt="p", attack=attack, position=position,
                   depth=depth, trajectory_source=source, ablation=ablation, context_ids=[1, 2], answer_start=1,
                   continuation_ids=[3], continuation_text="x", finish_reason="length", exact_ids=True,
                   refused=refused)


def outcomes(model, attack, position, pattern, **fields):
    return [episode(model, attack, position, refused, index, **fields) for index, refused in enumerate(pattern)]


def test_matrix_rows_tell_trajectory_sources_ablation_and_headlines_apart():
    prefill = Prefill(depths=[0, 10])
    adaptive = Adaptive(budgets=[4, 16])
    episodes = (outcomes("runs/x/trajectory", prefill, PrefillPosition(depth=10), [1, 1, 0], depth=10)
                + outcomes("runs/x/trajectory", prefill, PrefillPosition(depth=0), [1, 1, 1], depth=0)
                + outcomes("runs/x/trajectory", prefill, PrefillPosition(depth=10), [0, 0, 0], depth=10,
                           source="target")
                + outcomes("runs/x/trajectory", prefill, PrefillPosition(depth=10), [0, 1, 0], depth=10,
                           source="model:smollm2-135m@T=1")
                + outcomes("shallow", prefill, PrefillPosition(depth=10), [0, 0], depth=10, ablation="d")
                + outcomes("shallow", adaptive, AdaptivePosition(budget=16), [1, 0])
                + outcomes("shallow", adaptive, AdaptivePosition(budget=4), [1, 1]))
    matrix = attack_matrix(episodes)
    assert set(matrix) == {"prefill [smollm2-135m] k>=1", "prefill [smollm2-135m] k=0", "prefill [target] k>=1",
                           "prefill [smollm2-135m@T=1] k>=1", "prefill [smollm2-135m] k>=1 +ablated",
                           "adaptive [smollm2-135m] budget=16"}
    cell = matrix["prefill [smollm2-135m] k>=1"]["trajectory"]
    assert (cell["n"], cell["recovered"], cell["ci95"]) == (3, 2, wilson_interval(2, 3))
    assert matrix["adaptive [smollm2-135m] budget=16"]["shallow"]["n"] == 2, "smaller budgets stay out"
    assert source_name("model:runs/models/shallow@T=0.7,seed=2") == "shallow@T=0.7,seed=2"


def test_budget_curve_is_verified_success_per_budget():
    adaptive = Adaptive(budgets=[4, 16])
    episodes = (outcomes("m", adaptive, AdaptivePosition(budget=4), [1, 1, 0, 1])
                + outcomes("m", adaptive, AdaptivePosition(budget=16), [0, 1, 0, 0]))
    (curve,) = budget_curves(episodes).values()
    assert [(point["budget"], point["n"], point["recovered"]) for point in curve] == [(4, 4, 1), (16, 4, 3)]
    assert curve[1]["rate"] == 0.75 and curve[1]["ci95"] == wilson_interval(3, 4)


def test_recovery_against_steps_starts_from_the_same_models_prefill():
    finetune = Finetune(steps=[5, 20], depths=[0, 10])
    prefill = Prefill(depths=[0, 10, 40])
    episodes = (outcomes("m", finetune, FinetunePosition(steps=5, depth=10), [1, 0], depth=10)
                + outcomes("m", finetune, FinetunePosition(steps=5, depth=0), [1, 1], depth=0)
                + outcomes("m", finetune, FinetunePosition(steps=20, depth=10), [0, 0], depth=10)
                + outcomes("m", prefill, PrefillPosition(depth=10), [1, 1, 1], depth=10)
                + outcomes("m", prefill, PrefillPosition(depth=40), [0, 0], depth=40)
                + outcomes("other", prefill, PrefillPosition(depth=10), [0], depth=10))
    assert {series: [(p["steps"], p["n"], p["recovered"]) for p in points]
            for series, points in steps_curves(episodes).items()} == {"m harmful SFT": [(0, 3, 3), (5, 2, 1),
                                                                                        (20, 2, 0)]}
    assert attack_row(episodes[0]) == "finetune [smollm2-135m] harmful k=5, depth>=1"


def test_report_carries_the_matrix_and_the_curves(tmp_path):
    adaptive, finetune = Adaptive(budgets=[4, 16]), Finetune(steps=[5], depths=[10])
    episodes = (outcomes("a", RandomInsert(), RandomInsertPosition(insertions=1), [1, 0, 0])
                + outcomes("a", adaptive, AdaptivePosition(budget=4), [1, 0])
                + outcomes("a", adaptive, AdaptivePosition(budget=16), [0, 0])
                + outcomes("a", finetune, FinetunePosition(steps=5, depth=10), [1, 0], depth=10))
    EpisodeLog(tmp_path / "run").append(episodes)
    page = build_report([tmp_path / "run"], tmp_path / "report" / "report.html", tokenizer_spec="nowhere")
    text = page.read_text()
    assert "Attacks × models" in text and "random-insert [smollm2-135m]" in text
    assert {path.name for path in (tmp_path / "report").glob("*.png")} >= {
        "attacks_by_models.png", "budget_success.png", "recovery_by_finetune_steps.png"}
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "| random-insert [smollm2-135m] x1 | 33% [6%, 79%] n=3 |" in summary


@pytest.mark.parametrize("preset", ["quick", "full", "compare"])
def test_held_out_attacks_per_preset_are_valid_eval_configs(preset, tmp_path):
    attacks = held_out_attacks(preset, train_behaviors=Path("train.jsonl"), foreign_model="runs/other",
                               benign_sft=Path("benign.jsonl"))
    assert "random-insert" in attacks
    if preset != "quick":
        assert {"random-insert-x3", "prefill-target", "prefill-sampled", "prefill-foreign", "adaptive", "ablation",
                "finetune-harmful", "finetune-benign"} <= set(attacks)
        assert attacks["finetune-harmful"].attack.train_dataset == "train.jsonl"
        assert attacks["finetune-benign"].attack.train_dataset == "benign.jsonl"
        assert attacks["prefill-sampled"].trajectories.endswith("@T=1") and attacks["ablation"].ablate
    for held_out in attacks.values():
        config = EvalConfig(attack=held_out.attack, trajectories=held_out.trajectories, out=tmp_path)
        assert EvalConfig.model_validate_json(config.model_dump_json()).attack == held_out.attack
    assert "finetune-harmful" not in held_out_attacks("full")
