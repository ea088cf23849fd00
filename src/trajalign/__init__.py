"""trajalign: measure and train LLM safety along the whole generation trajectory.

The public API is re-exported here and imported lazily, so `import trajalign` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "trajalign.models.loading",
    "load_tokenizer": "trajalign.models.loading",
    "TokenizerHandle": "trajalign.models.loading",
    "ModelSpec": "trajalign.models.loading",
    "pull_embedded": "trajalign.models.loading",
    "ModelHandle": "trajalign.models.loading",
    "ChatFormat": "trajalign.models.chat",
    "Behavior": "trajalign.data.datasets",
    "load_behaviors": "trajalign.data.datasets",
    "load_trajectories": "trajalign.data.trajectories",
    "Prefill": "trajalign.attacks",
    "Insert": "trajalign.attacks",
    "MultiInsert": "trajalign.attacks",
    "Decoding": "trajalign.attacks",
    "ReinjectHeader": "trajalign.attacks",
    "ATTACKS": "trajalign.attacks",
    "Episode": "trajalign.records",
    "EvalConfig": "trajalign.evaluate",
    "Evaluation": "trajalign.evaluate",
    "run_eval": "trajalign.evaluate",
    "ProbeConfig": "trajalign.probe.run",
    "run_probe": "trajalign.probe.run",
    "select_direction": "trajalign.probe.direction",
    "probe_trajectories": "trajalign.probe.trajectory",
    "predictivity": "trajalign.probe.predictivity",
    "within_depth_summary": "trajalign.probe.predictivity",
    "depth_profile": "trajalign.probe.predictivity",
    "UtilityConfig": "trajalign.utility",
    "run_utility": "trajalign.utility",
    "PMIJudge": "trajalign.helpfulness",
    "AgreementConfig": "trajalign.agreement",
    "judge_agreement": "trajalign.agreement",
    "RecipeConfig": "trajalign.train.recipes",
    "TrainConfig": "trajalign.train.trainer",
    "run_training": "trajalign.train.trainer",
    "reproduce": "trajalign.reproduce",
    "build_report": "trajalign.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'trajalign' has no attribute {name!r}")
