"""Seconds per training step of 16 rows with the benign levers (perturbation rows, KL anchoring) against the plain
trajectory recipe, and per DPO step of 16 pairs, all in one process on the same rows and model.

    python benchmarks/lever_cost.py [--model smollm2-135m] [--steps 4]

Each variant trains `--steps` steps on the same behaviors (half harmful, half anchors, as benign_ratio 1 gives);
the first step of each warms up and is left out. Wall and CPU seconds (process time: all threads) per step.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback

from trajalign.data.datasets import load_behaviors
from trajalign.models import load_model
from trajalign.train import preference, trainer
from trajalign.train.preference import PreferenceSettings, build_pairs, train_preference
from trajalign.train.recipes import RecipeConfig
from trajalign.train.trainer import TrainConfig, prepare_materials, run_training

BATCH = 16
PERTURBED = {"plain": 0.5, "prefix": 0.25, "insertion": 0.25}
VARIANTS = {"trajectory (plain anchors)": ({"plain": 1.0}, 0.0), "+ benign perturbation (lever 2)": (PERTURBED, 0.0),
            "+ KL anchoring 0.1 (lever 3)": ({"plain": 1.0}, 0.1), "+ both (levers 2 and 3)": (PERTURBED, 0.1)}


class StepTimer(TrainerCallback):
    def __init__(self):
        self.steps: list[tuple[float, float]] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append((time.perf_counter() - self.started[0], time.process_time() - self.started[1]))


def timed(factory, timer: StepTimer):
    """The trainer class `factory` makes, reporting its step times to `timer`."""
    def make():
        class Timed(factory()):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.add_callback(timer)

        return Timed

    return make


def per_step(timer: StepTimer) -> tuple[float, float]:
    steady = timer.steps[1:]
    return statistics.median(wall for wall, _ in steady), statistics.median(cpu for _, cpu in steady)


def report(name: str, results: dict) -> None:
    """One line per variant as soon as it is measured (a long run may not live to the end)."""
    wall, cpu = results[name]
    baseline_wall, baseline_cpu = next(iter(results.values()))
    print(f"{name:>34}: {wall:6.2f} s wall ({wall / baseline_wall:.2f}x), {cpu:6.2f} s CPU "
          f"({cpu / baseline_cpu:.2f}x) per step", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    rows = BATCH * args.steps
    harmful = load_behaviors("advbench", limit=rows // 2)
    benign = load_behaviors("jbb-benign", limit=rows // 4) + load_behaviors("self-instruct-seed", limit=rows // 4)
    results = {}
    sft_factory, dpo_factory = trainer._trainer_class, preference._trainer_class
    with tempfile.TemporaryDirectory() as scratch:
        cache = Path(scratch) / "cache"
        for name, (benign_mix, kl_weight) in VARIANTS.items():
            timer = StepTimer()
            trainer._trainer_class = timed(sft_factory, timer)
            config = TrainConfig(model=args.model, recipe=RecipeConfig(benign_ratio=1.0, benign_mix=benign_mix),
                                 kl_weight=kl_weight, anchor_tokens=24, learning_rate=3e-4, epochs=1,
                                 batch_size=BATCH, save_steps=10_000, out=Path(scratch) / f"sft-{len(results)}")
            run_training(config, handle=load_model(args.model), harmful=harmful, benign=benign, cache_dir=cache)
            results[name] = per_step(timer)
            report(name, results)
            gc.collect()  # each variant's model, reference and optimizer state go before the next
        trainer._trainer_class = sft_factory
        timer = StepTimer()
        preference._trainer_class = timed(dpo_factory, timer)
        handle = load_model(args.model)
        config = TrainConfig(model=args.model, anchor_tokens=24, recipe=RecipeConfig(benign_ratio=1.0),
                             preference=PreferenceSettings())
        materials = prepare_materials(config, handle, harmful, benign, cache)
        pairs = build_pairs(config.preference, config.recipe, handle.chat, materials.harmful[:rows // 2],
                            materials.benign[:rows // 2])
        handle.model.get_input_embeddings().weight.requires_grad_(False)  # as the preference stage does
        train_preference(config.preference, handle.model.train(), handle.tokenizer, pairs, Path(scratch) / "dpo",
                         batch_size=BATCH, seed=0, on_gpu=False, bf16=False, save_steps=10_000)
        preference._trainer_class = dpo_factory
        results["DPO step, 16 pairs (lever 4)"] = per_step(timer)
        report("DPO step, 16 pairs (lever 4)", results)


if __name__ == "__main__":
    main()
