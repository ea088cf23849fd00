"""kill -9 in the middle of eval, probe and training; the re-run resumes and ends where an uninterrupted run does."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trajalign.runs import EpisodeLog
from trajalign.testing import save_tiny_model

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "trajalign.cli", *map(str, args)]


def run_to_end(argv, cwd):
    result = subprocess.run(argv, capture_output=True, text=True, env=ENV, cwd=cwd, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def kill_when(argv, cwd, ready) -> None:
    """Start the command, SIGKILL it as soon as `ready()` holds, and make sure it really was cut short."""
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, cwd=cwd)
    deadline = time.time() + 240
    while not ready():
        assert process.poll() is None, "finished before it could be killed: make the job longer"
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", num_layers=5)  # probes need a few layers


def eval_argv(model_dir, out):
    return cli("eval", "--model", model_dir, "--dataset", "advbench", "--limit", "40", "--trajectories", "target",
               "--depths", "0,2,4,8", "--max-new-tokens", "24", "--batch-size", "4", "--out", out)


def test_eval_killed_with_sigkill_resumes_to_the_same_result(model_dir, tmp_path):
    run_to_end(eval_argv(model_dir, tmp_path / "full"), tmp_path)
    log = EpisodeLog(tmp_path / "killed")
    kill_when(eval_argv(model_dir, tmp_path / "killed"), tmp_path,
              lambda: log.path.exists() and log.path.read_text().count("\n") >= 12)
    partial = log.load()
    assert 12 <= len(partial) < 160
    run_to_end(eval_argv(model_dir, tmp_path / "killed"), tmp_path)
    episodes = log.load()
    assert len(episodes) == len({e.episode_id for e in episodes}) == 160
    full = {e.episode_id: e.continuation_ids for e in EpisodeLog(tmp_path / "full").load()}
    assert {e.episode_id: e.continuation_ids for e in episodes} == full
    assert json.loads((tmp_path / "killed" / "summary.json").read_text()) == \
        json.loads((tmp_path / "full" / "summary.json").read_text())


def probe_argv(model_dir, out):
    return cli("probe", "--model", model_dir, "--harmful", "advbench", "--harmless", "jbb-benign", "--dataset",
               "advbench", "--limit", "24", "--trajectories", "target", "--out", out)


def test_probe_killed_with_sigkill_reruns_to_the_same_result(model_dir, tmp_path):
    run_to_end(probe_argv(model_dir, tmp_path / "full"), tmp_path)
    kill_when(probe_argv(model_dir, tmp_path / "killed"), tmp_path,
              lambda: (tmp_path / "killed" / "config.yaml").exists())
    assert not (tmp_path / "killed" / "predictivity.json").exists()
    run_to_end(probe_argv(model_dir, tmp_path / "killed"), tmp_path)
    for name in ("readings.jsonl", "direction.json"):
        assert (tmp_path / "killed" / name).read_text() == (tmp_path / "full" / name).read_text()


def train_argv(model_dir, out):
    return cli("train", "--config", write_train_config(model_dir, out))


def write_train_config(model_dir, out) -> Path:
    path = Path(str(out) + ".yaml")
    path.write_text(f"model: {model_dir}\nrecipe: {{name: trajectory}}\nharmful_limit: 48\nbenign: [jbb-benign]\n"
                    f"benign_limit: 24\ntrajectories: target\nepochs: 2\nbatch_size: 4\nsave_steps: 5\n"
                    f"learning_rate: 0.001\nout: {out}\n")
    return path


def test_training_killed_with_sigkill_resumes_from_its_checkpoint(model_dir, tmp_path):
    run_to_end(train_argv(model_dir, tmp_path / "full"), tmp_path)
    checkpoints = tmp_path / "killed" / "checkpoints"
    kill_when(train_argv(model_dir, tmp_path / "killed"), tmp_path,
              lambda: any((path / "trainer_state.json").exists() for path in checkpoints.glob("checkpoint-*")))
    assert not (tmp_path / "killed" / "trajalign-trained.json").exists()
    run_to_end(train_argv(model_dir, tmp_path / "killed"), tmp_path)
    assert not checkpoints.exists(), "a finished run keeps no resume point"
    resumed = load_file(tmp_path / "killed" / "model.safetensors")
    uninterrupted = load_file(tmp_path / "full" / "model.safetensors")
    # Resuming changes only the order of float reductions (differences of ~1e-5 seen); Adam at learning rate 1e-3
    # moves weights by about 1e-3 per step, so a lost or repeated step is far outside the tolerance.
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("recipe", ["refusal-ablation", "backtracking"])
def test_comparator_training_killed_with_sigkill_resumes_to_the_same_model(model_dir, tmp_path, recipe):
    """Comparators keep state beyond the trainer's: the refusal direction of the last refresh, a grown vocabulary."""
    def argv(out):
        path = Path(str(out) + ".yaml")
        path.write_text(f"model: {model_dir}\nrecipe: {{name: {recipe}}}\nharmful_limit: 24\nbenign: [jbb-benign]\n"
                        f"benign_limit: 24\ntrajectories: target\nepochs: 2\nbatch_size: 4\nsave_steps: 3\n"
                        f"learning_rate: 0.001\nout: {out}\n")
        return cli("train", "--config", path)

    run_to_end(argv(tmp_path / "full"), tmp_path)
    checkpoints = tmp_path / "killed" / "checkpoints"
    kill_when(argv(tmp_path / "killed"), tmp_path,
              lambda: any((path / "trainer_state.json").exists() for path in checkpoints.glob("checkpoint-*")))
    run_to_end(argv(tmp_path / "killed"), tmp_path)
    resumed = load_file(tmp_path / "killed" / "model.safetensors")
    uninterrupted = load_file(tmp_path / "full" / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    # Resuming changes only the order of float reductions (differences of ~1e-5 seen); Adam at learning rate 1e-3
    # moves weights by about 1e-3 per step, so a lost or repeated step is far outside the tolerance.
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-4, rtol=1e-3)
