"""Do internal scores predict real recovery? AUROC (bootstrap 95% CI) and Spearman, per depth and pooled."""

from __future__ import annotations

from collections import defaultdict

from trajalign.probe.trajectory import DepthReading
from trajalign.records import Episode
from trajalign.stats import auroc, bootstrap_auroc, spearman


def score_columns(reading: DepthReading) -> dict[str, float]:
    columns = {"onset_score": reading.onset_score}
    columns.update({f"projection_L{layer}": value for layer, value in reading.projections.items()})
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
    joined = join(readings, episodes)
    groups: dict[str, list] = defaultdict(list)
    for row in joined:
        groups[f"depth={row[1]}"].append(row)
        groups["pooled"].append(row)
    results = []
    for group, rows in groups.items():
        recovered = [row[3] for row in rows]
        for score in rows[0][2]:
            values = [row[2][score] for row in rows]
            low, high = bootstrap_auroc(values, recovered, resamples)
            results.append({"group": group, "score": score, "n": len(rows), "recovered": sum(recovered),
                            "auroc": auroc(values, recovered), "auroc_ci95": (low, high),
                            "spearman": spearman(values, recovered)})
    return results
