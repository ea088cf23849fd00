"""Do internal scores predict real recovery? AUROC (bootstrap 95% CI) and Spearman per depth, pooled over depths
k >= 1, and within depth; and, between models, the mean projection per depth beside the recovery rate.

Depth confounds a pooled figure: at depth 0 nearly every harmful episode is refused and the projection is highest,
so depth alone predicts both. Depth 0 is therefore reported apart, and the within-depth summary compares only
episodes at the same depth.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from trajalign.probe.trajectory import DepthReading
from trajalign.records import Episode
from trajalign.stats import auroc, bootstrap_auroc, bootstrap_interval, spearman, wilson_interval

MIN_PER_CLASS = 2  # a depth enters the within-depth summary with at least this many recovered and not recovered


def score_columns(reading: DepthReading) -> dict[str, float]:
    columns = {"onset_score": reading.onset_score}
    columns.update({f"projection_L{layer}": value for layer, value in reading.projections.items()})
    columns.update({f"reference_projection_L{layer}": value for layer, value in reading.reference_projections.items()})
    if reading.kl_to_reference is not None:
        columns["kl_to_reference"] = reading.kl_to_reference
    return columns


def join(readings: list[DepthReading], episodes: list[Episode]) -> list[tuple[str, int, dict[str, float], bool]]:
    """Match prefill episodes with readings of the same behavior at the same depth, in (behavior, depth) order:
    an episode log's order depends on when rows finished decoding, and the bootstrap must not."""
    by_key = {(reading.behavior_id, reading.depth): reading for reading in readings}
    joined = []
    for episode in sorted(episodes, key=lambda episode: (episode.behavior_id, episode.depth)):
        if episode.attack_kind != "prefill" or episode.defense is not None:
            continue
        reading = by_key.get((episode.behavior_id, episode.depth))
        if reading is not None:
            joined.append((episode.behavior_id, episode.depth, score_columns(reading), episode.refused))
    return joined


def predictivity(readings: list[DepthReading], episodes: list[Episode], resamples: int = 1000) -> list[dict]:
    """Per depth ('depth=k') and pooled over depths k >= 1 ('pooled'); depth 0 stays in its own group."""
    joined = join(readings, episodes)
    groups: dict[str, list] = defaultdict(list)
    for row in joined:
        groups[f"depth={row[1]}"].append(row)
        if row[1] >= 1:
            groups["pooled"].append(row)
    results = []
    for group, rows in groups.items():
        recovered = [row[3] for row in rows]
        for score in rows[0][2]:
            values = [row[2][score] for row in rows]
            low, high = bootstrap_auroc(values, recovered, resamples)
            results.append({"group": group, "depths": sorted({row[1] for row in rows}), "score": score,
                            "n": len(rows), "recovered": sum(recovered), "auroc": auroc(values, recovered),
                            "auroc_ci95": (low, high), "spearman": spearman(values, recovered)})
    return results


def mean_within_depth_auroc(scores: np.ndarray, recovered: np.ndarray, depths: np.ndarray) -> float:
    """The mean over depths of the AUROC among episodes at that depth (depths left with one class are skipped)."""
    values = [auroc(scores[depths == depth], recovered[depths == depth]) for depth in np.unique(depths)]
    values = [value for value in values if not np.isnan(value)]
    return float(np.mean(values)) if values else float("nan")


def entered_depths(rows: list[tuple], min_per_class: int = MIN_PER_CLASS) -> list[int]:
    """Depths k >= 1 with at least `min_per_class` recovered and `min_per_class` not-recovered episodes."""
    counts: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for _, depth, _, recovered in rows:
        counts[depth][int(recovered)] += 1
    return sorted(depth for depth, (kept, recovered) in counts.items()
                  if depth >= 1 and kept >= min_per_class and recovered >= min_per_class)


def within_depth_summary(readings: list[DepthReading], episodes: list[Episode], resamples: int = 1000,
                         min_per_class: int = MIN_PER_CLASS) -> list[dict]:
    """Per score: the mean within-depth AUROC over the depths k >= 1 where both outcomes occur (bootstrap 95% CI,
    episodes resampled within their depth), beside the AUROC pooled over depths k >= 1 and the AUROC at depth 0."""
    joined = join(readings, episodes)
    if not joined:
        return []
    depths_in = entered_depths(joined, min_per_class)
    summary = []
    for score in joined[0][2]:
        entered = [row for row in joined if row[1] in depths_in]
        scores = np.array([row[2][score] for row in entered], dtype=float)
        recovered = np.array([row[3] for row in entered], dtype=bool)
        depths = np.array([row[1] for row in entered], dtype=int)
        pooled = [row for row in joined if row[1] >= 1]
        pooled_scores, pooled_recovered = [row[2][score] for row in pooled], [row[3] for row in pooled]
        at_zero = [row for row in joined if row[1] == 0]
        summary.append({
            "score": score, "depths_entered": depths_in, "n_entered": len(entered),
            "mean_within_depth_auroc": mean_within_depth_auroc(scores, recovered, depths) if entered else float("nan"),
            "mean_within_depth_auroc_ci95": bootstrap_interval(
                mean_within_depth_auroc, [scores, recovered, depths], resamples, strata=depths)
            if entered else (float("nan"), float("nan")),
            "pooled_depth_ge1_n": len(pooled), "pooled_depth_ge1_recovered": sum(pooled_recovered),
            "pooled_depth_ge1_auroc": auroc(pooled_scores, pooled_recovered),
            "pooled_depth_ge1_auroc_ci95": bootstrap_auroc(pooled_scores, pooled_recovered, resamples)
            if pooled else (float("nan"), float("nan")),
            "depth0_n": len(at_zero), "depth0_recovered": sum(row[3] for row in at_zero),
            "depth0_auroc": auroc([row[2][score] for row in at_zero], [row[3] for row in at_zero]),
        })
    return summary


def depth_profile(readings: list[DepthReading], episodes: list[Episode], layer: int,
                  shared_layer: int | None = None, own_is_shared: bool = False) -> list[dict]:
    """Per depth, over the prefill episodes with a reading: the recovery rate (Wilson 95% CI), the mean projection
    on the model's own direction at `layer` and, with `shared_layer`, on the shared (original model's) direction;
    `own_is_shared` for the model whose direction is the shared one."""
    by_key = {(reading.behavior_id, reading.depth): reading for reading in readings}
    by_depth: dict[int, list[tuple[DepthReading, bool]]] = defaultdict(list)
    for episode in episodes:
        reading = by_key.get((episode.behavior_id, episode.depth))
        if episode.attack_kind == "prefill" and episode.defense is None and reading is not None:
            by_depth[episode.depth].append((reading, episode.refused))
    rows = []
    for depth, members in sorted(by_depth.items()):
        recovered = sum(outcome for _, outcome in members)
        shared = [reading.projections[layer] if own_is_shared else reading.reference_projections.get(shared_layer)
                  for reading, _ in members]
        rows.append({"depth": depth, "n": len(members), "recovered": recovered,
                     "recovery_rate": recovered / len(members),
                     "recovery_ci95": wilson_interval(recovered, len(members)),
                     "mean_projection": float(np.mean([reading.projections[layer] for reading, _ in members])),
                     "mean_shared_projection": float(np.mean(shared)) if None not in shared else None})
    return rows
