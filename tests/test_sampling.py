"""The sampler against an independent numpy computation of the filtered distribution, and its draws against it."""

import numpy as np
import pytest
import torch

from trajalign.backends.base import Sampling
from trajalign.backends.sampling import filtered_distribution, sample_token

SETTINGS = [Sampling(temperature=1.0), Sampling(temperature=0.7, top_k=5), Sampling(temperature=1.5, top_p=0.5),
            Sampling(temperature=0.8, top_p=0.9, top_k=12), Sampling(temperature=1.0, top_k=1),
            Sampling(temperature=2.0, top_p=0.05)]


def reference_distribution(logits: np.ndarray, temperature: float, top_p: float, top_k: int) -> np.ndarray:
    """Temperature, then keep the k highest scores, then the most likely tokens until their mass reaches top_p."""
    scores = logits.astype(np.float64) / temperature
    keep = np.ones(len(scores), dtype=bool)
    if top_k > 0:
        keep &= scores >= np.sort(scores)[-top_k]
    probabilities = np.where(keep, np.exp(scores - scores[keep].max()), 0.0)
    probabilities /= probabilities.sum()
    if top_p < 1.0:
        order = np.argsort(-probabilities)
        mass_before = np.cumsum(probabilities[order]) - probabilities[order]
        nucleus = np.zeros(len(scores), dtype=bool)
        nucleus[order[mass_before < top_p]] = True
        probabilities = np.where(nucleus, probabilities, 0.0)
        probabilities /= probabilities.sum()
    return probabilities


def logits(seed: int, vocab: int = 40, scale: float = 2.5) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("sampling", SETTINGS, ids=str)
def test_filtered_distribution_equals_numpy_reference(sampling):
    for seed in range(5):
        values = logits(seed)
        expected = reference_distribution(values.numpy(), sampling.temperature, sampling.top_p, sampling.top_k)
        np.testing.assert_allclose(filtered_distribution(values, sampling).numpy(), expected, atol=1e-6)


def test_filters_cut_where_they_should():
    values = logits(3)
    assert (filtered_distribution(values, Sampling(1.0, top_k=5)) > 0).sum() == 5
    assert (filtered_distribution(values, Sampling(1.0, top_k=1)) > 0).sum() == 1
    # the nucleus is the smallest set of most likely tokens whose mass reaches top_p
    full = filtered_distribution(values, Sampling(1.0)).sort(descending=True).values
    size = int((full.cumsum(0) < 0.8).sum()) + 1
    assert (filtered_distribution(values, Sampling(1.0, top_p=0.8)) > 0).sum() == size


def total_variation(draws: list[int], probabilities: np.ndarray) -> float:
    counts = np.bincount(draws, minlength=len(probabilities)) / len(draws)
    return 0.5 * float(np.abs(counts - probabilities).sum())


@pytest.mark.parametrize("sampling", [Sampling(0.7, top_p=0.9, top_k=8), Sampling(1.3, top_p=0.6)], ids=str)
def test_draws_follow_the_filtered_distribution(sampling):
    values = logits(11, vocab=30, scale=0.7)  # flat enough that the filters cut real mass
    expected = reference_distribution(values.numpy(), sampling.temperature, sampling.top_p, sampling.top_k)
    generator = torch.Generator().manual_seed(0)
    draws = [sample_token(values, sampling, generator) for _ in range(4000)]
    assert set(draws) <= set(np.flatnonzero(expected))  # nothing outside the filtered support
    # 4000 draws over about ten tokens: sampling noise keeps the distance near 0.02; a wrong filter moves it further
    assert total_variation(draws, expected) < 0.04
    unfiltered = reference_distribution(values.numpy(), sampling.temperature, 1.0, 0)
    assert total_variation(draws, unfiltered) > 0.1  # the check tells the filtered distribution from another
