"""Cost of each held-out attack on the embedded model at the full preset's size: 40 test behaviors, 24
continuation tokens, 48-token trajectories, generation batches of 64, as `trajalign reproduce --preset full` runs.

    python benchmarks/attack_cost.py [--out runs/attack_cost] [--only adaptive,ablation]

Attacks run one after another on the original model (the unaligned one: its refusals are few, so continuations
run long, the costly case), each into its own run directory; a finished one is read back, not re-timed (delete
its directory to time it again). Prints wall and CPU seconds (process time: all threads) per attack, its episode
count and its refusal rate. The ablation attack needs a refusal direction: one is selected first (as the quick
preset's probe does: 16 prompts per class, every 6th layer) and its cost printed apart, since the study's probe
stage computes it anyway.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from trajalign.attacks.held_out import held_out_attacks
from trajalign.data.datasets import load_behaviors, write_behaviors
from trajalign.evaluate import AblationConfig, EvalConfig, Evaluation
from trajalign.models import load_model
from trajalign.models.registry import DEFAULT_MODEL
from trajalign.probe.direction import RefusalDirection, select_direction
from trajalign.reproduce import GENERATION_BATCH_SIZE, PRESETS, split_behaviors

TIMINGS_FILE = "timing.json"


def direction_for(handle, out: Path, test_ids: set[str]) -> Path:
    path = out / "direction"
    if not RefusalDirection.tensors_file(path).exists():
        started = time.perf_counter(), time.process_time()
        harmful = [b.prompt for b in load_behaviors("advbench") if b.id not in test_ids][-16:]
        harmless = [b.prompt for b in load_behaviors("jbb-benign")][:16]
        select_direction(handle, harmful, harmless, 16, positions=[-1], layer_step=6).save(path)
        print(f"direction: {time.perf_counter() - started[0]:.0f} s wall, "
              f"{time.process_time() - started[1]:.0f} s CPU", flush=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/attack_cost"))
    parser.add_argument("--only", default=None, help="comma-separated attack names")
    args = parser.parse_args()
    preset = PRESETS["full"]
    train, test = split_behaviors(preset)
    test_file = write_behaviors(args.out / "test.jsonl", test)
    train_file = write_behaviors(args.out / "train.jsonl", train)
    handle = load_model(DEFAULT_MODEL)
    attacks = held_out_attacks("full", train_behaviors=train_file)
    chosen = args.only.split(",") if args.only else list(attacks)
    print(f"{'attack':<18} {'episodes':>8} {'wall s':>8} {'CPU s':>8} {'refused':>8}", flush=True)
    for name in chosen:
        held_out = attacks[name]
        out = args.out / name
        ablate = AblationConfig(direction=direction_for(handle, args.out, {b.id for b in test})) \
            if held_out.ablate else None
        config = EvalConfig(model=DEFAULT_MODEL, dataset=str(test_file), trajectories=held_out.trajectories,
                            trajectory_tokens=preset.trajectory_tokens, attack=held_out.attack, ablate=ablate,
                            max_new_tokens=preset.continuation_tokens, batch_size=GENERATION_BATCH_SIZE, out=out)
        timing_file = out / TIMINGS_FILE
        if not timing_file.exists():
            started = time.perf_counter(), time.process_time()
            summary = Evaluation(config, handle=handle).run()
            timing = {"wall_s": time.perf_counter() - started[0], "cpu_s": time.process_time() - started[1],
                      "episodes": summary["episodes"],
                      "refused": sum(row["refused"] for row in summary["rows"])}
            timing_file.write_text(json.dumps(timing))
        timing = json.loads(timing_file.read_text())
        print(f"{name:<18} {timing['episodes']:>8} {timing['wall_s']:>8.0f} {timing['cpu_s']:>8.0f} "
              f"{timing['refused'] / timing['episodes']:>8.0%}", flush=True)


if __name__ == "__main__":
    main()
