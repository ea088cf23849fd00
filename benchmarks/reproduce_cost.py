"""Peak resident memory, wall and CPU seconds of each stage of a reproduction, against a named baseline run.

    python benchmarks/reproduce_cost.py [--preset quick] [--out DIR] [--save cost.json] [--baseline OTHER.json]

Runs `trajalign reproduce` in this process (into a fresh directory unless --out names one to resume) and prints, per
stage, its wall seconds, CPU seconds (user + system, all threads: what a shared machine does not inflate) and peak
resident memory (the kernel's high-water mark, reset as each stage starts). `--save` keeps the figures as JSON;
`--baseline` prints them beside those of an earlier run, e.g. of another commit:

    PYTHONPATH=/path/to/other/checkout/src python benchmarks/reproduce_cost.py --save before.json
    python benchmarks/reproduce_cost.py --baseline before.json
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from trajalign import reproduce


def resident_peak_mb() -> float:
    """The process's resident high-water mark (VmHWM) since start or since the last reset."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def reset_resident_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := current resident size


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure_stages(costs: dict[str, dict]) -> None:
    """Wrap Reproduction.stage so that every stage records its costs into `costs`."""
    stage = reproduce.Reproduction.stage

    def measured(self, name: str):
        inner = stage(self, name)

        @contextmanager
        def recording():
            reset_resident_peak()
            started, cpu_started = time.perf_counter(), cpu_seconds()
            with inner as progress:
                yield progress
            costs[name] = {"wall_s": time.perf_counter() - started, "cpu_s": cpu_seconds() - cpu_started,
                           "peak_rss_mb": resident_peak_mb()}

        return recording()

    reproduce.Reproduction.stage = measured


def print_costs(costs: dict, baseline: dict | None) -> None:
    header = f"{'stage':<20} {'wall s':>8} {'cpu s':>8} {'peak MB':>8}"
    print(header + ("   vs baseline: wall, cpu, peak" if baseline else ""))
    for name, cost in costs.items():
        line = f"{name:<20} {cost['wall_s']:8.1f} {cost['cpu_s']:8.1f} {cost['peak_rss_mb']:8.0f}"
        before = (baseline or {}).get(name)
        if before:
            line += "   " + ", ".join(f"{cost[key] / before[key]:.2f}x" for key in ("wall_s", "cpu_s", "peak_rss_mb"))
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--out", type=Path, help="run directory (default: a fresh temporary one)")
    parser.add_argument("--save", type=Path, help="write the figures to this JSON file")
    parser.add_argument("--baseline", type=Path, help="a JSON file from an earlier --save, printed alongside")
    args = parser.parse_args()
    costs: dict[str, dict] = {}
    measure_stages(costs)
    started, cpu_started = time.perf_counter(), cpu_seconds()
    with tempfile.TemporaryDirectory() as scratch:
        reproduce.Reproduction(args.preset, args.out or Path(scratch) / "run").run()
    # Resetting the high-water mark resets getrusage's maximum too: the run's peak is its stages' highest.
    costs["total"] = {"wall_s": time.perf_counter() - started, "cpu_s": cpu_seconds() - cpu_started,
                      "peak_rss_mb": max(cost["peak_rss_mb"] for cost in costs.values())}
    baseline = json.loads(args.baseline.read_text()) if args.baseline else None
    print_costs(costs, baseline)
    if args.save:
        args.save.write_text(json.dumps(costs, indent=1))


if __name__ == "__main__":
    main()
