import itertools
import math

import numpy as np
import pytest

from trajalign.stats import auroc, bootstrap_auroc, mcnemar_exact, spearman, wilson_interval


def test_wilson_matches_published_values():
    low, high = wilson_interval(8, 10)  # Newcombe (1998): 0.490 - 0.943
    assert (round(low, 3), round(high, 3)) == (0.490, 0.943)
    assert wilson_interval(0, 20)[0] == 0.0


def test_auroc_equals_pairwise_count():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 5, 40).astype(float)
    labels = rng.random(40) < 0.4
    pairs = [(p, n) for p, n in itertools.product(scores[labels], scores[~labels])]
    expected = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert auroc(scores, labels) == pytest.approx(expected)
    assert math.isnan(auroc([1, 2], [True, True]))
    low, high = bootstrap_auroc(scores, labels, resamples=200)
    assert low <= auroc(scores, labels) <= high


def test_spearman_is_pearson_of_ranks():
    x = np.array([1, 2, 3, 4, 5.0])
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)


def test_mcnemar_exact():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_exact(3, 3) == 1.0
