"""Seconds per training example of each recipe, against refusal-sft at the same example count, one process.

    python benchmarks/train_cost.py [--examples 48] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from trajalign.data.datasets import load_behaviors
from trajalign.data.trajectories import load_trajectories
from trajalign.models import load_model
from trajalign.train.recipes import RECIPES, RecipeConfig
from trajalign.train.trainer import TrainConfig, run_training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    harmful = load_behaviors("advbench", limit=args.examples)
    trajectories = load_trajectories(f"model:{args.model}", harmful, load_model(args.model), 48)
    seconds = {}
    with tempfile.TemporaryDirectory() as scratch:
        for recipe in RECIPES:
            config = TrainConfig(model=args.model, recipe=RecipeConfig(name=recipe, benign_ratio=0.0), epochs=1,
                                 batch_size=args.batch_size, save_steps=10_000, out=Path(scratch) / recipe)
            handle = load_model(args.model)
            started = time.perf_counter()
            run_training(config, handle=handle, harmful=harmful, benign=[], trajectories=trajectories,
                         cache_dir=Path(scratch) / "cache")
            rows = json.loads((config.out / "trajalign-trained.json").read_text())["rows"]
            seconds[recipe] = (time.perf_counter() - started) / rows
    for recipe, value in seconds.items():
        print(f"{recipe:>20}: {value:6.3f} s/example  ({value / seconds['refusal-sft']:.2f}x refusal-sft)")


if __name__ == "__main__":
    main()
