"""The held-out attacks of the study: perturbations that no recipe trains on, each with what it needs to run.

`held_out_attacks(preset)` names them for a preset size; the study runs each one on every model's held-out test
behaviors (an `EvalConfig` per model and attack: `trajectories` as given here, `ablate` set to the model's own
refusal direction where asked).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from trajalign.attacks import Adaptive, Attack, Finetune, Prefill, RandomInsert
from trajalign.models.registry import DEFAULT_MODEL


class HeldOutAttack(BaseModel):
    """One held-out attack as the study runs it on a model's test behaviors."""

    model_config = ConfigDict(extra="forbid")
    attack: Attack
    trajectories: str = Field(description="the trajectory source it injects")
    ablate: bool = Field(default=False, description="with the attacked model's own refusal direction projected "
                         "out (EvalConfig.ablate: the direction that model's probe found)")
    note: str = Field(default="", description="what the attack tests, for the report")


def held_out_attacks(preset: str, train_behaviors: Path | None = None, original: str = DEFAULT_MODEL,
                     foreign_model: str | None = None, benign_sft: Path | None = None) -> dict[str, HeldOutAttack]:
    """name -> held-out attack for the `quick`, `full` or `compare` preset.

    `train_behaviors` (a behaviors file of the study's training split) is what fine-tuning attacks train harmful
    SFT on; without it they are left out. They attack aligned models: the original, unaligned, has nothing to
    lose. `benign_sft` (a behaviors file with reference answers) is what benign SFT trains on, so that a study
    whose models train on Dolly anchors can keep the attack's rows out of them (default: Dolly's first training
    rows). `foreign_model` (a model sharing the original's tokenizer) adds a prefill of its greedy answers.
    """
    greedy = f"model:{original}"
    attacks = {"random-insert": HeldOutAttack(
        attack=RandomInsert(insertions=1, samples=2 if preset == "quick" else 4), trajectories=greedy,
        note="one span of 5-15 harmful tokens at a random point of the model's own answer (Lyu et al. 2026)")}
    if preset == "quick":
        return attacks
    attacks |= {
        "random-insert-x3": HeldOutAttack(attack=RandomInsert(insertions=3, samples=2), trajectories=greedy,
                                          note="three spans at random points of one answer"),
        # AdvBench's targets are 11-36 tokens long: of compare's 20 test behaviors, two reach depth 20
        "prefill-target": HeldOutAttack(attack=Prefill(depths=[5, 10] if preset == "compare" else [5, 10, 20]),
                                         trajectories="target",
                                         note="AdvBench's 'Sure, here is ...' target as the prefill"),
        "prefill-sampled": HeldOutAttack(attack=Prefill(depths=[5, 10, 20, 40]), trajectories=f"{greedy}@T=1",
                                         note="a sampled (T=1, seeded) answer of the original model"),
        # the search costs ~0.14 s of CPU per query on the embedded model (benchmarks/attack_cost.py): a budget
        # of 32 is ~3 minutes per model on 40 behaviors, 128 is ~12
        "adaptive": HeldOutAttack(attack=Adaptive(budgets=[4, 8, 16, 32]), trajectories=greedy,
                                  note="white-box search of the insertion that most lowers the refusal onset"),
        "ablation": HeldOutAttack(attack=Prefill(depths=[0, 10, 20]), trajectories=greedy, ablate=True,
                                  note="the model's refusal direction projected out at every layer, with and "
                                       "without prefill"),
    }
    if foreign_model is not None:
        attacks["prefill-foreign"] = HeldOutAttack(attack=Prefill(depths=[5, 10, 20, 40]),
                                                   trajectories=f"model:{foreign_model}",
                                                   note="greedy answers of another model with the same tokenizer")
    if train_behaviors is not None:
        # k = 50 broke every model of the full preset as k = 20 did (0-2% recovery), and k = 20 broke every model
        # of the compare preset (0-25%) for about 40% of a model's held-out attack time: compare stops at 5
        finetune_steps = [5] if preset == "compare" else [5, 20, 50]
        train_datasets = {"harmful": str(train_behaviors), "benign": str(benign_sft) if benign_sft else None}
        for data, train_dataset in train_datasets.items():
            attacks[f"finetune-{data}"] = HeldOutAttack(
                attack=Finetune(data=data, steps=finetune_steps, depths=[0, 10, 20], train_dataset=train_dataset,
                                train_trajectories=greedy),
                trajectories=greedy, note=f"k steps of {data} SFT, then the prefill sweep (Qi et al. 2024)")
    return attacks
