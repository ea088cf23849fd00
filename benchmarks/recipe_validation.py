"""Train one model of the reproduction with changed settings and score it on the validation split, never the test.

    python benchmarks/recipe_validation.py [--preset full] [--recipe trajectory] [--learning-rate 3e-4]
        [--anchor-tokens 24] [--benign-ratio R] [--epochs E] [--lora R] [--contrastive-pairs]
        [--jbb-anchor-copies N] [--anchors SOURCE[:N] ...] [--anchor-answers self|reference]
        [--anchor-weight W] [--benign-mix prefix=0.25,insertion=0.25,plain=0.5] [--kl-weight L]
        [--preference] [--dpo-beta B] [--dpo-epochs E] [--dpo-learning-rate LR] [--pairs-per-behavior N]
        [--harmful-extra SOURCE[:N] ...] [--rounds N] [--out runs/validation]

The validation split (`trajalign.reproduce.validation_sets`) holds AdvBench behaviors after the training ones and
benign prompts that are neither anchors nor over-refusal test prompts; this is where the presets' settings were
chosen. Prints the reproduction's table for the one model.

Over-refusal levers tried there: `--contrastive-pairs` adds the JailbreakBench harmful behavior of each
JailbreakBench benign anchor (its twin) to the harmful training behaviors, except those whose goal is an AdvBench
goal (the validation and test behaviors are AdvBench's); `--jbb-anchor-copies N` puts each JailbreakBench benign
anchor N times among the anchors to sample from.

The levers of issue 18, each a setting of the role's training (`trajalign.reproduce.RoleTraining`):
(1) `--anchors coconot-pref:200 --anchors dolly-train:200` adds anchor sources, answered by the original model
(`--anchor-answers self`) or by the datasets' own answers (`reference`), `--anchor-weight` times as often per
prompt as the preset's anchors; (2) `--benign-mix` perturbs that share of the anchor rows (prefill, insertion of
another benign answer's span) and trains them to continue; (3) `--kl-weight` adds KL(original || model) on benign
rows; (4) `--preference` runs DPO after SFT; (5) `--harmful-extra catqa:200` adds harmful training behaviors
(none whose goal is an AdvBench goal); (6) `--rounds N` attacks each round's model on its training behaviors and
trains again with the failures added (the validation row is the last round's).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trajalign.data.datasets import Behavior, load_behaviors
from trajalign.data.trajectories import load_trajectories
from trajalign.models.loading import load_model
from trajalign.models.registry import DEFAULT_MODEL
from trajalign.reproduce import (
    GENERATION_BATCH_SIZE,
    PRESETS,
    RECIPE_OF_ROLE,
    Reproduction,
    RoleTraining,
    benign_sets,
    split_behaviors,
    summary_markdown,
    validation_sets,
    without_advbench,
)
from trajalign.train.sources import parse_source

ROLE_OF_RECIPE = {recipe: role for role, recipe in RECIPE_OF_ROLE.items()}


def contrastive_twins(anchors: list[Behavior]) -> list[Behavior]:
    """JailbreakBench pairs each benign behavior with a harmful one by index; AdvBench goals are left out."""
    anchor_ids = {anchor.id for anchor in anchors}
    return without_advbench([harmful for harmful in load_behaviors("jbb-harmful")
                             if harmful.id.replace("jbb-harmful", "jbb-benign") in anchor_ids])


def parse_shares(text: str) -> dict[str, float]:
    """'prefix=0.25,insertion=0.25,plain=0.5' -> {'prefix': 0.25, ...}."""
    try:
        return {kind.strip(): float(share) for kind, share in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': expected KIND=SHARE,... e.g. prefix=0.25,plain=0.75") from None


def role_training(args: argparse.Namespace, default: RoleTraining) -> RoleTraining:
    """The preset's settings for the role, with those given on the command line changed."""
    preference = None
    if args.preference:
        preference = {field: value for field, value in {
            "beta": args.dpo_beta, "epochs": args.dpo_epochs, "learning_rate": args.dpo_learning_rate,
            "pairs_per_behavior": args.pairs_per_behavior}.items() if value is not None}
    changes = {field: value for field, value in {
        "benign_ratio": args.benign_ratio, "epochs": args.epochs, "lora": {"r": args.lora} if args.lora else None,
        "anchor_sources": [{**parse_source(source), "answers": args.anchor_answers, "weight": args.anchor_weight}
                           for source in args.anchors] or None,
        "harmful_sources": args.harmful_extra or None, "benign_mix": args.benign_mix, "kl_weight": args.kl_weight,
        "preference": preference, "rounds": args.rounds}.items() if value is not None}
    return RoleTraining.model_validate({**default.model_dump(), **changes})


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--recipe", choices=sorted(ROLE_OF_RECIPE), default="trajectory")
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--anchor-tokens", type=int)
    parser.add_argument("--benign-ratio", type=float)
    parser.add_argument("--epochs", type=float)
    parser.add_argument("--lora", type=int, metavar="R", help="train a LoRA adapter of rank R")
    parser.add_argument("--contrastive-pairs", action="store_true")
    parser.add_argument("--jbb-anchor-copies", type=int, default=1)
    parser.add_argument("--anchors", action="append", default=[], metavar="SOURCE[:N]",
                        help="lever 1: an anchor source beside the preset's (repeatable)")
    parser.add_argument("--anchor-answers", choices=["self", "reference"], default="self",
                        help="lever 1: answers of the --anchors sources")
    parser.add_argument("--anchor-weight", type=float, default=1.0,
                        help="lever 1: rows per prompt of the --anchors sources, relative to the preset's anchors")
    parser.add_argument("--benign-mix", type=parse_shares, help="lever 2: shares of plain, prefix and insertion "
                        "anchor rows")
    parser.add_argument("--kl-weight", type=float, help="lever 3: weight of KL(original || model) on benign rows")
    parser.add_argument("--preference", action="store_true", help="lever 4: a DPO stage after SFT")
    parser.add_argument("--dpo-beta", type=float)
    parser.add_argument("--dpo-epochs", type=float)
    parser.add_argument("--dpo-learning-rate", type=float)
    parser.add_argument("--pairs-per-behavior", type=int)
    parser.add_argument("--harmful-extra", action="append", default=[], metavar="SOURCE[:N]",
                        help="lever 5: harmful training behaviors beside AdvBench's (repeatable)")
    parser.add_argument("--rounds", type=int, help="lever 6: on-policy rounds")
    parser.add_argument("--out", type=Path, default=Path("runs/validation"))
    return parser


def main() -> None:
    args = parser().parse_args()
    role = ROLE_OF_RECIPE[args.recipe]
    default = PRESETS[args.preset]
    training = role_training(args, default.training[role])
    changes = {field: value for field, value in {"learning_rate": args.learning_rate,
                                                 "anchor_tokens": args.anchor_tokens}.items() if value is not None}
    preset = default.model_copy(update={**changes, "training": {**default.training, role: training},
                                        "decoding": False})
    run = Reproduction(args.preset, args.out, preset=preset)
    train, _ = split_behaviors(preset)
    anchors, _ = benign_sets(preset)
    if args.contrastive_pairs:
        train = train + contrastive_twins(anchors)
    jbb_anchors = [anchor for anchor in anchors if anchor.dataset == "jbb-benign"]
    anchors = anchors + jbb_anchors * (args.jbb_anchor_copies - 1)
    harmful, benign = validation_sets(preset)
    trajectories = load_trajectories(f"model:{DEFAULT_MODEL}", train + harmful, load_model(DEFAULT_MODEL),
                                     preset.trajectory_tokens, GENERATION_BATCH_SIZE, cache_dir=args.out / "cache")
    with run.stage(f"train {role}"):
        run.train(role, train, anchors, trajectories)
    with run.stage(f"validate {role}"):
        results = {role: run.evaluate(role, harmful, trajectories, benign)}
    print(f"settings: {preset.model_dump_json()}")
    print(summary_markdown({"preset": f"{args.preset} (validation split)", "results": results, "probes": {},
                            "timings_s": run.timings, "total_s": sum(run.timings.values())}))


if __name__ == "__main__":
    main()
