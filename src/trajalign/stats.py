"""Statistics for small samples: Wilson intervals, bootstrap intervals, AUROC, Cohen's kappa, Spearman, McNemar."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (1-based), ties sharing their mean rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=float)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def auroc(scores, labels) -> float:
    """Probability that a positive scores above a negative (ties count half); NaN without both classes."""
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = _ranks(scores)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def bootstrap_interval(statistic: Callable[..., float], arrays: Sequence, resamples: int = 1000, seed: int = 0,
                       strata=None) -> tuple[float, float]:
    """Percentile 95% interval of `statistic(*arrays)` over resamples of the rows (the arrays are paired: one
    index draws a row from each). With `strata`, rows are drawn within each stratum, keeping its size. Resamples
    on which the statistic is NaN (e.g. an AUROC left with one class) are dropped."""
    arrays = [np.asarray(array) for array in arrays]
    rng = np.random.default_rng(seed)
    n = len(arrays[0])
    groups = [np.flatnonzero(np.asarray(strata) == value) for value in np.unique(strata)] if strata is not None \
        else None
    values = []
    for _ in range(resamples):
        if groups is None:
            index = rng.integers(0, n, n)
        else:
            index = np.concatenate([members[rng.integers(0, len(members), len(members))] for members in groups])
        value = statistic(*(array[index] for array in arrays))
        if not math.isnan(value):
            values.append(value)
    if not values:
        return (float("nan"), float("nan"))
    return (float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5)))


def bootstrap_auroc(scores, labels, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    return bootstrap_interval(auroc, [np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)], resamples,
                              seed)


def cohen_kappa(first, second) -> float:
    """Cohen's kappa between two raters' labels of the same items: (p_o - p_e) / (1 - p_e), p_e from each rater's
    own label shares; NaN when chance agreement is 1 (both raters gave every item one and the same label)."""
    first, second = np.asarray(first), np.asarray(second)
    if len(first) == 0:
        return float("nan")
    observed = float(np.mean(first == second))
    chance = sum(float(np.mean(first == label)) * float(np.mean(second == label))
                 for label in np.union1d(first, second))
    if chance >= 1.0:
        return float("nan")
    return (observed - chance) / (1.0 - chance)


def spearman(x, y) -> float:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2:
        return float("nan")
    rank_x, rank_y = _ranks(x), _ranks(y)
    if rank_x.std() == 0 or rank_y.std() == 0:
        return float("nan")
    return float(np.corrcoef(rank_x, rank_y)[0, 1])


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pair counts (a binomial test at p = 1/2)."""
    n = only_first + only_second
    if n == 0:
        return 1.0
    k = min(only_first, only_second)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)
