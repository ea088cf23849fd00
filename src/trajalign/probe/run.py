"""`trajalign probe`: a refusal direction, per-depth readings along trajectories, and their predictivity."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from trajalign.data.datasets import load_behaviors
from trajalign.data.trajectories import load_trajectories
from trajalign.errors import InputError
from trajalign.models.loading import ModelSpec, load_model
from trajalign.models.registry import DEFAULT_MODEL
from trajalign.probe.direction import RefusalDirection, refusal_opening_ids, select_direction
from trajalign.probe.predictivity import predictivity, within_depth_summary
from trajalign.probe.trajectory import DepthReading, probe_trajectories
from trajalign.runs import EpisodeLog, write_config


class ProbeConfig(ModelSpec):
    """A refusal direction for a model, its readings along trajectories, and whether they predict recovery."""

    harmful: str = Field(default="advbench", description="harmful prompts for the direction")
    harmless: str = Field(default="jbb-benign", description="harmless prompts for the direction")
    direction_prompts: int = Field(default=32, gt=1, description="prompts per class for the direction")
    direction: Path | None = Field(default=None, description="reuse a saved direction instead of computing one")
    reference_direction: Path | None = Field(
        default=None, description="a saved direction of another model (the original): readings also carry "
                                  "projections on it, at its layer")
    layer_step: int = Field(default=2, gt=0, description="try every n-th layer when selecting the direction")
    dataset: str = Field(default="advbench", description="behaviors whose trajectories are probed")
    limit: int | None = 40
    trajectories: str = f"model:{DEFAULT_MODEL}"
    trajectory_tokens: int = Field(default=48, gt=0)
    reference: str | None = Field(default=None, description="reference model for the per-token KL")
    eval_runs: list[Path] = Field(default_factory=list, description="eval runs whose recovery the scores predict")
    batch_size: int = 16
    out: Path = Path("runs/probe")


def run_probe(config: ProbeConfig, handle=None, behaviors=None, trajectories=None, exclude_ids=(),
              progress=None) -> dict:
    """Directions are computed on prompts whose ids are not in `exclude_ids` (e.g. the test behaviors);
    `progress(done, total, unit)` follows the direction's candidates and the trajectories' generation."""
    write_config(config.out, config)
    handle = handle or config.load_model()
    shared = _reference_direction(config.reference_direction, handle.model.get_input_embeddings().weight.shape[1])
    if config.direction:
        direction = RefusalDirection.load(config.direction)
    else:
        harmful = [b.prompt for b in load_behaviors(config.harmful) if b.id not in exclude_ids]
        harmless = [b.prompt for b in load_behaviors(config.harmless)]
        direction = select_direction(handle, harmful[-config.direction_prompts:],
                                     harmless[:config.direction_prompts], config.batch_size,
                                     positions=[-1], layer_step=config.layer_step, progress=progress)
        direction.save(config.out / "direction")
    behaviors = behaviors or load_behaviors(config.dataset, limit=config.limit)
    trajectories = trajectories or load_trajectories(config.trajectories, behaviors, handle,
                                                     config.trajectory_tokens, cache_dir=config.out / "cache",
                                                     progress=progress)
    reference = load_model(config.reference, device=str(handle.device)) if config.reference else None
    layers = sorted({direction.layer, len(direction.mean_diff) // 2, len(direction.mean_diff) - 1})
    readings = probe_trajectories(
        handle, [(b.id, handle.chat.prompt_ids(b.prompt), trajectories[b.id].token_ids) for b in behaviors],
        refusal_opening_ids(handle.chat), direction.direction, layers, reference, config.batch_size,
        reference_direction=shared.direction if shared else None, reference_layers=[shared.layer] if shared else None)
    with open(config.out / "readings.jsonl", "w", encoding="utf-8") as file:
        file.writelines(reading.model_dump_json() + "\n" for reading in readings)
    results = {"direction": {"layer": direction.layer, "position": direction.position}, "predictivity": {},
               "within_depth": {}}
    if shared:
        results["reference_direction"] = {"path": str(config.reference_direction), "layer": shared.layer}
    for run in config.eval_runs:
        episodes = EpisodeLog(run).load()
        results["predictivity"][str(run)] = predictivity(readings, episodes)
        results["within_depth"][str(run)] = within_depth_summary(readings, episodes)
    (config.out / "predictivity.json").write_text(json.dumps(results, indent=2))
    return results


def _reference_direction(path: Path | None, hidden_size: int) -> RefusalDirection | None:
    if path is None:
        return None
    shared = RefusalDirection.load(path)
    if shared.direction.shape != (hidden_size,):
        raise InputError(f"{path}: a direction of size {shared.direction.shape[0]}, but this model's residual stream "
                         f"has size {hidden_size}; the reference direction must come from the same architecture")
    return shared


def load_readings(directory: Path) -> list[DepthReading]:
    lines = (Path(directory) / "readings.jsonl").read_text(encoding="utf-8").splitlines()
    return [DepthReading.model_validate_json(line) for line in lines]
