"""A backtracking model's resets against a logit bias on its reset token, on the validation split, never the test.

    python benchmarks/reset_bias.py MODEL_DIR [--biases=-4,-2,0,2] [--preset compare] [--out runs/reset-bias]
        [--trajectories model:smollm2-135m]

Zhang et al. (2024) tune false resets against recoveries with a logit bias on the reset token; this measures that
trade-off (`EvalConfig.reset_logit_bias`) where the compare preset's settings were chosen: the validation split's
harmful behaviors, prefilled with the original model's own answers at the preset's depths, and its four harmless
sources at depth 0 (`trajalign.reproduce.validation_sets`). Per bias it prints the share of harmful episodes that
reset and that refuse (a reset or a keyword refusal), the lowest refusal over depths, and the false resets and
refusals of the harmless prompts, with Wilson 95% intervals; the differences against bias 0 are measured in the
same process. Each bias's evaluations keep their run directories under --out (re-running resumes them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trajalign.attacks import Prefill
from trajalign.data.datasets import write_behaviors
from trajalign.data.trajectories import load_trajectories
from trajalign.evaluate import EvalConfig, Evaluation
from trajalign.models import load_model
from trajalign.models.registry import DEFAULT_MODEL
from trajalign.reproduce import GENERATION_BATCH_SIZE, PRESETS, validation_sets
from trajalign.runs import EpisodeLog
from trajalign.stats import wilson_interval


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a backtracking model's directory (its tokenizer has [RESET])")
    parser.add_argument("--biases", default="-4,-2,0,2", help="comma-separated; 0 is the baseline and always runs")
    parser.add_argument("--preset", default="compare", choices=sorted(PRESETS))
    parser.add_argument("--out", type=Path, default=Path("runs/reset-bias"))
    parser.add_argument("--trajectories", default=f"model:{DEFAULT_MODEL}",
                        help="what the harmful behaviors are prefilled with (the study's: the original's answers)")
    return parser


def share(count: int, n: int) -> str:
    low, high = wilson_interval(count, n)
    return f"{100 * count / n:.0f}% [{100 * low:.0f}, {100 * high:.0f}]" if n else "-"


def evaluations(model: str, handle, bias: float, harmful, benign, trajectories, source: str, preset,
                out: Path) -> dict:
    """Each evaluation with its behaviors written into its run directory, so that its config.yaml re-runs it."""
    common = dict(model=model, trajectory_tokens=preset.trajectory_tokens, max_new_tokens=preset.continuation_tokens,
                  batch_size=GENERATION_BATCH_SIZE, reset_logit_bias=bias)

    def evaluation(name: str, behaviors, depths: list[int], given: dict | None = None) -> Evaluation:
        dataset = write_behaviors(out / name / "behaviors.jsonl", behaviors)
        config = EvalConfig(dataset=str(dataset), trajectories=source, attack=Prefill(depths=depths),
                            out=out / name, **common)
        return Evaluation(config, handle=handle, behaviors=behaviors, trajectories=given)

    runs = {"harmful": evaluation("harmful", harmful, preset.depths, trajectories)}
    return runs | {name: evaluation(name, behaviors, [0]) for name, behaviors in benign.items()}


def measured(runs: dict) -> dict[str, tuple[int, int, int]]:
    """Per evaluation (and per harmful depth): (resets, refusals, episodes)."""
    counts = {}
    for name, evaluation in runs.items():
        episodes = EpisodeLog(evaluation.config.out).load()
        groups = {name: episodes}
        if name == "harmful":
            groups |= {f"harmful@{depth}": [e for e in episodes if e.depth == depth]
                       for depth in sorted({e.depth for e in episodes})}
        for group, members in groups.items():
            counts[group] = (sum(e.reset for e in members), sum(e.refused for e in members), len(members))
    return counts


def print_table(results: dict[float, dict[str, tuple[int, int, int]]], benign: list[str]) -> None:
    """One row per bias, then each bias's change in resets against bias 0, in points."""
    depths = sorted(key for key in results[0.0] if key.startswith("harmful@"))
    print("| bias | harmful: reset | harmful: refused | lowest refused over depths | "
          + " | ".join(f"{name}: reset / refused" for name in benign) + " |")
    print("|---" * (4 + len(benign)) + "|")
    for bias in results:
        row = results[bias]
        lowest = min(depths, key=lambda key: row[key][1] / row[key][2])
        cells = [f"{bias:+g}", share(row["harmful"][0], row["harmful"][2]), share(row["harmful"][1], row["harmful"][2]),
                 f"{share(row[lowest][1], row[lowest][2])} ({lowest.split('@')[1]})"]
        cells += [f"{share(row[name][0], row[name][2])} / {share(row[name][1], row[name][2])}" for name in benign]
        print("| " + " | ".join(cells) + " |")
    baseline = results[0.0]
    for bias in results:
        if bias:
            moved = [(results[bias][name][0] - baseline[name][0]) / baseline[name][2] for name in ["harmful", *benign]]
            print(f"bias {bias:+g} against 0, resets in points: "
                  + ", ".join(f"{name} {100 * change:+.0f}" for name, change in zip(["harmful", *benign], moved)))


def main(argv: list[str] | None = None) -> dict[float, dict[str, tuple[int, int, int]]]:
    args = parser().parse_args(argv)
    preset = PRESETS[args.preset]
    biases = sorted({float(value) for value in args.biases.split(",")} | {0.0})
    harmful, benign = validation_sets(preset)
    handle = load_model(args.model)
    trajectories = load_trajectories(args.trajectories, harmful, handle, preset.trajectory_tokens,
                                     GENERATION_BATCH_SIZE, cache_dir=args.out / "cache")
    results = {}
    for bias in biases:
        runs = evaluations(args.model, handle, bias, harmful, benign, trajectories, args.trajectories, preset,
                           args.out / f"bias{bias:+g}")
        for evaluation in runs.values():
            evaluation.run()
        results[bias] = measured(runs)
        print(f"bias {bias:+g} done", flush=True)
    print_table(results, list(benign))
    return results


if __name__ == "__main__":
    main()
