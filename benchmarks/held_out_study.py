"""Attack the models of an existing reproduction with the held-out attacks, and print the attacks x models table.

    python benchmarks/held_out_study.py RUN [--preset full] [--attacks quick|full]

`trajalign reproduce` runs the held-out attacks itself (after each model's probe); this runs that stage alone on a
reproduction directory whose models and evaluations already exist (one made before the stage did, or with a
smaller set of held-out attacks), into the same `evals/MODEL/held-out/NAME` directories, resumable. Its table is
written to `RUN/held_out.md` and printed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trajalign.reproduce import PRESETS, Reproduction, attack_lines, split_behaviors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--preset", default="full", choices=list(PRESETS))
    parser.add_argument("--attacks", default="full", choices=["quick", "full"])
    args = parser.parse_args()
    preset = PRESETS[args.preset].model_copy(update={"held_out": args.attacks})
    study = Reproduction(args.preset, args.run, preset=preset)
    train, test = split_behaviors(preset)
    saved_split = json.loads((args.run / "split.json").read_text())
    if saved_split["test"] != [behavior.id for behavior in test]:
        raise SystemExit(f"{args.run / 'split.json'}: not the {args.preset} preset's split")
    trajectories = study.original_answers(train + test, None)
    for role in study.roles:
        with study.stage(f"held-out attacks {role}") as progress:
            study.held_out(role, train, test, trajectories, progress)
    lines = attack_lines(study.attack_matrix())
    (args.run / "held_out.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
