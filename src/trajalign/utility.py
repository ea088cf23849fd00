"""Utility as reference likelihood: a model's mean per-token NLL of human answers, and its change against another."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
from pydantic import Field

from trajalign.data.datasets import Behavior, load_behaviors
from trajalign.errors import InputError
from trajalign.likelihood import MAX_BATCH_TOKENS, answer_log_probs
from trajalign.models.loading import ModelSpec
from trajalign.stats import bootstrap_interval


class UtilityConfig(ModelSpec):
    """Mean per-token NLL of reference answers under `model`, beside `reference_model` (the original) if given."""

    reference_model: str | None = Field(default=None, description="model spec to compare with (the original)")
    dataset: str = Field(default="dolly-eval", description="behaviors with reference answers (bundled or a file)")
    limit: int | None = Field(default=None, description="first N behaviors only")
    max_batch_tokens: int = Field(default=MAX_BATCH_TOKENS, gt=0, description="padded tokens per forward pass")
    resamples: int = Field(default=1000, gt=0, description="bootstrap resamples for the interval")
    out: Path = Field(default=Path("runs/utility.json"), description="JSON result file")


def require_references(behaviors: list[Behavior], source: str | None = None) -> None:
    """`source` names the dataset file or bundled name in the error."""
    for behavior in behaviors:
        if not behavior.reference or not behavior.reference.strip():
            raise InputError(f"{source or behavior.dataset} behavior '{behavior.id}' field 'reference': empty; the "
                             f"utility measure needs a human reference answer for every behavior")


def reference_items(handle, behaviors: list[Behavior]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids from the chat format, reference ids tokenized on their own without special tokens)."""
    require_references(behaviors)
    return [(handle.chat.prompt_ids(behavior.prompt),
             list(handle.tokenizer(behavior.reference, add_special_tokens=False)["input_ids"]))
            for behavior in behaviors]


def reference_nll(handle, behaviors: list[Behavior], max_batch_tokens: int = MAX_BATCH_TOKENS,
                  progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Per behavior: reference tokens, their summed NLL and the mean per-token NLL (nats)."""
    all_log_probs = answer_log_probs(handle, reference_items(handle, behaviors), max_batch_tokens, progress)
    return [{"id": behavior.id, "tokens": len(log_probs), "nll_sum": -float(log_probs.sum()),
             "nll": -float(log_probs.mean())} for behavior, log_probs in zip(behaviors, all_log_probs)]


def relative_change_pct(values, reference_values) -> float:
    """100 x (mean - reference mean) / reference mean: positive when the model finds the answers less likely."""
    return float(100.0 * (np.mean(values) - np.mean(reference_values)) / np.mean(reference_values))


def compare(rows: list[dict], reference_rows: list[dict], resamples: int = 1000, seed: int = 0) -> dict:
    """The change in mean per-token NLL against the reference model, with paired bootstrap 95% intervals
    (examples resampled, the same draw for both models)."""
    values = np.array([row["nll"] for row in rows])
    reference_values = np.array([row["nll"] for row in reference_rows])
    return {
        "reference_mean_nll": float(reference_values.mean()),
        "change": float(values.mean() - reference_values.mean()),
        "change_ci95": bootstrap_interval(lambda a, b: float(a.mean() - b.mean()), [values, reference_values],
                                          resamples, seed),
        "relative_change_pct": relative_change_pct(values, reference_values),
        "relative_change_pct_ci95": bootstrap_interval(relative_change_pct, [values, reference_values],
                                                       resamples, seed),
    }


def _check_same_tokens(handle, reference_handle, behaviors: list[Behavior], reference: str) -> None:
    ours, theirs = reference_items(handle, behaviors), reference_items(reference_handle, behaviors)
    for behavior, our_ids, their_ids in zip(behaviors, ours, theirs):
        if our_ids != their_ids:
            raise InputError(f"reference model '{reference}': tokenizes behavior '{behavior.id}' differently; a "
                             f"per-token NLL is comparable only between models that share a tokenizer")


def run_utility(config: UtilityConfig, handle=None, reference_handle=None,
                progress: Callable[[int, int], None] | None = None) -> dict:
    """Measure, write `config.out` (JSON) and return the result."""
    from trajalign.models.loading import load_model

    def load(spec: str):
        return load_model(spec, dtype=config.dtype, device=config.device,
                          trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle)

    behaviors = load_behaviors(config.dataset, limit=config.limit)
    require_references(behaviors, config.dataset)  # before any model is loaded
    handle = handle or load(config.model)
    rows = reference_nll(handle, behaviors, config.max_batch_tokens, progress)
    result = {"model": config.model, "dataset": config.dataset, "n": len(rows),
              "mean_nll": float(np.mean([row["nll"] for row in rows])),
              "tokens": sum(row["tokens"] for row in rows)}
    if config.reference_model is not None:
        reference_handle = reference_handle or load(config.reference_model)
        _check_same_tokens(handle, reference_handle, behaviors, config.reference_model)
        reference_rows = reference_nll(reference_handle, behaviors, config.max_batch_tokens, progress)
        result = {**result, "reference_model": config.reference_model,
                  **compare(rows, reference_rows, config.resamples)}
        for row, reference_row in zip(rows, reference_rows):
            row["reference_nll"] = reference_row["nll"]
    result["examples"] = rows
    config.out.parent.mkdir(parents=True, exist_ok=True)
    config.out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result
