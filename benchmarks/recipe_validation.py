"""Train one model of the reproduction with changed settings and score it on the validation split, never the test.

    python benchmarks/recipe_validation.py [--preset full] [--recipe trajectory] [--learning-rate 3e-4]
        [--anchor-tokens 24] [--benign-ratio R] [--epochs E] [--lora R] [--contrastive-pairs]
        [--jbb-anchor-copies N] [--out runs/validation]

The validation split (`trajalign.reproduce.validation_sets`) holds AdvBench behaviors after the training ones and
benign prompts that are neither anchors nor over-refusal test prompts; this is where the presets' settings were
chosen. Prints the reproduction's table for the one model.

Over-refusal levers tried there: `--contrastive-pairs` adds the JailbreakBench harmful behavior of each
JailbreakBench benign anchor (its twin) to the harmful training behaviors, except those whose goal is an AdvBench
goal (the validation and test behaviors are AdvBench's); `--jbb-anchor-copies N` puts each JailbreakBench benign
anchor N times among the anchors to sample from.
"""

from __future__ import annotations

import argparse
import re
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
    benign_sets,
    split_behaviors,
    summary_markdown,
    validation_sets,
)
from trajalign.train.trainer import LoraSettings

ROLE_OF_RECIPE = {recipe: role for role, recipe in RECIPE_OF_ROLE.items()}


def _normalized(prompt: str) -> str:
    return re.sub(r"\W+", " ", prompt.lower()).strip()


def contrastive_twins(anchors: list[Behavior]) -> list[Behavior]:
    """JailbreakBench pairs each benign behavior with a harmful one by index; AdvBench goals are left out."""
    anchor_ids = {anchor.id for anchor in anchors}
    advbench = {_normalized(behavior.prompt) for behavior in load_behaviors("advbench")}
    return [harmful for harmful in load_behaviors("jbb-harmful")
            if harmful.id.replace("jbb-harmful", "jbb-benign") in anchor_ids
            and _normalized(harmful.prompt) not in advbench]


def main() -> None:
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
    parser.add_argument("--out", type=Path, default=Path("runs/validation"))
    args = parser.parse_args()
    role = ROLE_OF_RECIPE[args.recipe]
    default = PRESETS[args.preset]
    training = default.training[role].model_copy(update={field: value for field, value in {
        "benign_ratio": args.benign_ratio, "epochs": args.epochs,
        "lora": LoraSettings(r=args.lora) if args.lora else None}.items() if value is not None})
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
