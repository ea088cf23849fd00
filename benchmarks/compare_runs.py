"""Compare the episodes of two run directories: the same episodes, fed the same ids, continued and judged alike?

    python benchmarks/compare_runs.py DIR_A DIR_B [--show 10]

Reads every episodes.jsonl below each directory (a reproduce directory holds one per evaluation) as raw JSON, so
it reads records from before attacks became classes (position a string, `recovered`) and after (position an
object, `refused`). Episodes are matched by model (a path inside the run directory by its place there, e.g.
models/shallow; any other spec as it is), dataset, behavior id, attack kind, position label, sample and defense.
For each pair it compares the context ids, the injected spans, the continuation ids and the verdicts (every
judge's, and the primary one). Prints counts and the first differences; exits 1 on any difference or on an
episode present on one side only, 0 when the two runs agree episode for episode.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from pydantic import TypeAdapter

from trajalign.attacks import Position

COMPARED = ("context_ids", "injected_spans", "continuation_ids", "verdicts", "primary verdict")
POSITIONS = TypeAdapter(Position)


def position_label(position) -> str:
    return position if isinstance(position, str) else POSITIONS.validate_python(position).label


def model_name(spec: str, root: Path) -> str:
    for prefix in {str(root), str(root.resolve())}:
        if spec.startswith(prefix.rstrip("/") + "/"):
            return spec[len(prefix.rstrip("/")) + 1:]
    return spec


def load_run(root: Path) -> dict[tuple, dict]:
    files = sorted(root.rglob("episodes.jsonl"))
    if not files:
        sys.exit(f"error: {root}: no episodes.jsonl in this directory or below it")
    episodes = {}
    for file in files:
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            record = json.loads(line)
            key = (model_name(record["model"], root), record["dataset"], record["behavior_id"],
                   record["attack_kind"], position_label(record["position"]), record.get("sample", 0),
                   record.get("defense"))
            if key in episodes:
                sys.exit(f"error: {file} row {number}: a second episode {key}")
            episodes[key] = {"context_ids": record["context_ids"], "injected_spans": record["injected_spans"],
                             "continuation_ids": record["continuation_ids"], "verdicts": record["verdicts"],
                             "primary verdict": record["refused"] if "refused" in record else record["recovered"]}
    return episodes


def first_difference(a, b) -> str:
    if isinstance(a, list) and isinstance(b, list):
        index = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return f"lengths {len(a)} / {len(b)}, first differing index {index}"
    return f"{json.dumps(a)[:120]} / {json.dumps(b)[:120]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--show", type=int, default=10, help="differences to print")
    args = parser.parse_args()
    first, second = load_run(args.first), load_run(args.second)
    shared = sorted(set(first) & set(second), key=str)
    only = {args.first: sorted(set(first) - set(second), key=str),
            args.second: sorted(set(second) - set(first), key=str)}
    differing: Counter = Counter()
    shown = []
    for key in shared:
        fields = [field for field in COMPARED if first[key][field] != second[key][field]]
        differing.update(fields)
        differing["episodes"] += bool(fields)
        if fields and len(shown) < args.show:
            shown.append(f"  {key}: " + "; ".join(f"{field} ({first_difference(first[key][field], second[key][field])})"
                                                 for field in fields))
    print(f"{args.first}: {len(first)} episodes; {args.second}: {len(second)} episodes; {len(shared)} matched")
    print(f"identical: {len(shared) - differing['episodes']}; differing: {differing['episodes']}"
          + "".join(f", {field} {differing[field]}" for field in COMPARED if differing[field]))
    for side, keys in only.items():
        if keys:
            print(f"only in {side}: {len(keys)}, e.g. {keys[0]}")
    if shown:
        print("first differences:", *shown, sep="\n")
    sys.exit(1 if differing["episodes"] or any(only.values()) else 0)


if __name__ == "__main__":
    main()
