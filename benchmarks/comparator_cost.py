"""Cost of one optimizer step of 16 rows for each comparator recipe, against the trajectory recipe, one process.

    python benchmarks/comparator_cost.py [--harmful 8] [--steps 3]

Each recipe trains `steps` steps on the same harmful behaviors (the embedded model's own 48-token trajectories)
and as many benign anchors; the figure is the median step, wall and CPU time of this process, timed from the
trainer's step-begin to step-end callbacks. refusal-ablation's direction refresh runs outside the steps and is
timed on its own (one refresh per `refresh_steps` steps).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback

import trajalign.train.trainer as trainer_module
from trajalign.data.datasets import load_behaviors
from trajalign.data.trajectories import load_trajectories
from trajalign.models import load_model
from trajalign.train.recipes import RecipeConfig
from trajalign.train.trainer import TrainConfig, run_training

RECIPES = ("trajectory", "prefix-constrained", "rto", "circuit-breaker", "refusal-ablation", "backtracking")


class StepTimer(TrainerCallback):
    def __init__(self):
        self.wall, self.cpu = [], []

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state, control, **kwargs):
        self.wall.append(time.perf_counter() - self.started[0])
        self.cpu.append(time.process_time() - self.started[1])


OBJECTIVE_FOR = trainer_module.objective_for


def timed_objectives(timer: StepTimer, kept: list):
    """trainer.objective_for, with the timer among each objective's callbacks (and the objective kept)."""
    def with_timer(recipe: str):
        objective = OBJECTIVE_FOR(recipe)
        callbacks = objective.callbacks
        objective.callbacks = lambda checkpoints: callbacks(checkpoints) + [timer]
        kept.append(objective)
        return objective

    return with_timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--harmful", type=int, default=8, help="harmful rows per step (and as many anchors)")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    harmful = load_behaviors("advbench", limit=args.harmful)
    benign = load_behaviors("jbb-benign", limit=args.harmful)
    trajectories = load_trajectories(f"model:{args.model}", harmful, load_model(args.model), 48)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for recipe in RECIPES:
            timer, kept = StepTimer(), []
            trainer_module.objective_for = timed_objectives(timer, kept)
            config = TrainConfig(model=args.model, recipe=RecipeConfig(name=recipe, benign_ratio=1.0),
                                 epochs=args.steps, batch_size=2 * args.harmful, anchor_tokens=24,
                                 learning_rate=3e-4, save_steps=10_000, out=Path(scratch) / recipe)
            handle = load_model(args.model)
            run_training(config, handle=handle, harmful=harmful, benign=benign, trajectories=trajectories,
                         cache_dir=Path(scratch) / "cache")
            results[recipe] = (statistics.median(timer.wall), statistics.median(timer.cpu))
            if recipe == "refusal-ablation":
                objective = kept[0]
                started = (time.perf_counter(), time.process_time())
                objective.current_directions(handle.model, 0)
                refresh = (time.perf_counter() - started[0], time.process_time() - started[1])
    base_wall, base_cpu = results["trajectory"]
    print(f"one step of {2 * args.harmful} rows, median of {args.steps} (wall / CPU of this process)")
    for recipe, (wall, cpu) in results.items():
        print(f"{recipe:>20}: {wall:6.2f} s wall {wall / base_wall:5.2f}x   {cpu:6.2f} s CPU {cpu / base_cpu:5.2f}x")
    print(f"{'direction refresh':>20}: {refresh[0]:6.2f} s wall {refresh[0] / base_wall:5.2f}x   "
          f"{refresh[1]:6.2f} s CPU {refresh[1] / base_cpu:5.2f}x  (every "
          f"{RecipeConfig().ablation.refresh_steps} steps)")


if __name__ == "__main__":
    main()
