import io

import pytest
from rich.console import Console

from trajalign.console import LineDisplay, LiveDisplay


def test_quiet_display_prints_only_stage_lines():
    lines = []
    display = LineDisplay(lines.append)
    with display.stage("train shallow") as progress:
        progress(3, 10, "steps", "loss 0.5")
    assert lines[0] == "[train shallow] ..." and lines[1].startswith("[train shallow] done in ") and len(lines) == 2


def test_live_display_shows_one_line_per_stage_with_its_latest_count():
    stream = io.StringIO()
    display = LiveDisplay(Console(file=stream, width=160, force_terminal=False))
    with display.stage("train shallow") as progress:
        progress(48, 48, "answers")
        progress(5, 12, "steps", "loss 0.912")
        progress(12, 12, "steps", "loss 0.321")
    lines = stream.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train shallow")
    assert "12/12 steps" in lines[0] and "loss 0.321" in lines[0] and "elapsed" in lines[0]
    assert "answers" not in lines[0]  # a new unit restarts the count


def test_a_failed_stage_leaves_no_line():
    stream = io.StringIO()
    display = LiveDisplay(Console(file=stream, width=160, force_terminal=False))
    with pytest.raises(RuntimeError):
        with display.stage("evaluate shallow") as progress:
            progress(3, 10, "prefill episodes")
            raise RuntimeError("broken")
    assert stream.getvalue().strip() == ""


@pytest.mark.integration
def test_smoke_reproduction_console(cli, tmp_path):
    """The main job's console: stage lines and the headline table, never a trainer's dictionaries or tqdm bars."""
    code, out, err = cli("reproduce", "--preset", "smoke", "--out", tmp_path / "run")
    assert code == 0, err[-3000:]
    assert "{'loss'" not in out and "{'loss'" not in err and "it/s]" not in err
    assert "refuse @0" in out and "trajectory" in out
    assert f"summary: {tmp_path / 'run' / 'summary.md'}" in out
    assert (tmp_path / "run" / "summary.md").exists() and (tmp_path / "run" / "report" / "report.html").exists()
    stages = [line.split(" ━")[0] for line in err.splitlines() if "━" in line]
    per_model = ["evaluate", "utility", "probe", "held-out attacks"]
    assert stages == ["trajectories", *[f"{stage} original" for stage in per_model],
                      *[f"{stage} {role}" for role in ("shallow", "trajectory") for stage in ["train", *per_model]],
                      "report"], err[-3000:]
    log = (tmp_path / "run" / "models" / "trajectory" / "training.log").read_text().splitlines()
    assert log[0].startswith("step 1/") and " loss " in log[0]
