"""benchmarks/compare_runs.py: two runs agree episode for episode, whatever the record format, or it says where not."""

import json
import subprocess
import sys
from pathlib import Path

from trajalign.attacks import Insert, Prefill
from trajalign.evaluate import EvalConfig, Evaluation

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "compare_runs.py"


def compare(first: Path, second: Path):
    return subprocess.run([sys.executable, str(SCRIPT), str(first), str(second)], capture_output=True, text=True)


def study(root: Path, tiny) -> Path:
    for name, attack in (("prefill", Prefill(depths=[0, 2])), ("insert", Insert(after=[1], span_lengths=[2]))):
        config = EvalConfig(model=str(root / "models" / "tiny"), dataset="advbench", limit=2, trajectories="target",
                            attack=attack, max_new_tokens=4, out=root / "evals" / name)
        Evaluation(config, handle=tiny).run()
    return root


def as_old_format(run: Path) -> None:
    """Rewrite records as they were before attacks became classes: position a label, `recovered`."""
    for file in run.rglob("episodes.jsonl"):
        records = [json.loads(line) for line in file.read_text().splitlines()]
        for record in records:
            record["position"] = {"prefill": "depth={depth}", "insert": "after={after},len={length}"}[
                record["attack_kind"]].format(**record["position"])
            record["recovered"] = record.pop("refused")
        file.write_text("".join(json.dumps(record) + "\n" for record in records))


def test_runs_agree_across_formats_and_differences_are_found(tiny, tmp_path):
    first, second = study(tmp_path / "a", tiny), study(tmp_path / "b", tiny)
    as_old_format(first)
    result = compare(first, second)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 matched" in result.stdout and "differing: 0" in result.stdout
    file = second / "evals" / "insert" / "episodes.jsonl"
    records = [json.loads(line) for line in file.read_text().splitlines()]
    records[0]["continuation_ids"] = records[0]["continuation_ids"][:-1] + [records[0]["continuation_ids"][-1] + 1]
    file.write_text("".join(json.dumps(record) + "\n" for record in records[:-1]))
    result = compare(first, second)
    assert result.returncode == 1
    assert "differing: 1, continuation_ids 1" in result.stdout and f"only in {first}: 1" in result.stdout
