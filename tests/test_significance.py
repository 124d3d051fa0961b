"""The paired block bootstrap (docs/scoring.md, "The decided order"): finds real differences, not noise, and gives
the same verdict for the same runs however they are handed over."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prism_ray.config import RankingSettings
from prism_ray.ranking.significance import (
    Curves,
    block_bootstrap_means,
    comparable,
    compare,
    pooled_sigma,
    sigma_to_use,
)

SETTINGS = RankingSettings()
CHUNKS = SETTINGS.chunks


def learning_curve(level: float, rng: np.random.Generator, noise: float = 0.02) -> list[float]:
    """A decreasing prequential curve (bpb per chunk) with chunk-to-chunk noise."""
    base = level + 1.5 * np.exp(-np.arange(CHUNKS) / 10.0)
    return list(base + noise * rng.standard_normal(CHUNKS))


def curves(key: str, *rows: list[float], span: int = 200_000) -> Curves:
    return Curves(key=key, span=span, chunk_bpb=tuple(tuple(row) for row in rows))


def test_a_known_difference_is_found_and_mirrored():
    rng = np.random.default_rng(1)
    shared = np.asarray(learning_curve(1.2, rng))
    old = curves("sub_a", list(shared + 0.01 * rng.standard_normal(CHUNKS)))
    new = curves("sub_b", list(shared - 0.05 + 0.01 * rng.standard_normal(CHUNKS)))
    verdict = compare(old, new, SETTINGS, sigma_seed=0.012)
    assert verdict.outcome == "better"
    assert 0.04 < verdict.improvement_bpb < 0.06 and verdict.lower_bpb > SETTINGS.dead_zone_bpb
    mirror = compare(new, old, SETTINGS, sigma_seed=0.012)
    assert mirror.outcome == "worse"
    assert (mirror.improvement_bpb, mirror.lower_bpb, mirror.upper_bpb) == (
        -verdict.improvement_bpb, -verdict.upper_bpb, -verdict.lower_bpb)


def test_no_difference_is_not_found():
    rng = np.random.default_rng(2)
    found = 0
    for _ in range(40):
        shared = np.asarray(learning_curve(1.2, rng))
        a = curves("sub_a", list(shared + 0.01 * rng.standard_normal(CHUNKS)))
        b = curves("sub_b", list(shared + 0.01 * rng.standard_normal(CHUNKS)))
        found += compare(a, b, SETTINGS, sigma_seed=0.0).outcome != "tied"
    assert found <= 1  # 99% one-sided each way, and a dead zone on top


def test_a_difference_inside_the_seed_noise_is_a_tie_until_replicas_shrink_it():
    rng = np.random.default_rng(3)
    shared = np.asarray(learning_curve(1.2, rng, noise=0.0))
    one_seed_a, one_seed_b = curves("sub_a", list(shared)), curves("sub_b", list(shared - 0.02))
    assert compare(one_seed_a, one_seed_b, SETTINGS, sigma_seed=0.0).outcome == "better"
    tied = compare(one_seed_a, one_seed_b, SETTINGS, sigma_seed=0.012)
    assert tied.outcome == "tied" and "confidence" in tied.why
    three = [list(shared + 0.001 * k) for k in range(3)]
    replicated_a = curves("sub_a", *three)
    replicated_b = curves("sub_b", *[list(np.asarray(row) - 0.04) for row in three])
    assert compare(replicated_a, replicated_b, SETTINGS, sigma_seed=0.012).outcome == "better"


def test_the_verdict_does_not_depend_on_row_order_and_repeats_exactly():
    rng = np.random.default_rng(4)
    rows_a = [learning_curve(1.2, rng) for _ in range(3)]
    rows_b = [learning_curve(1.18, rng) for _ in range(3)]
    first = compare(curves("sub_a", *rows_a), curves("sub_b", *rows_b), SETTINGS, sigma_seed=0.01)
    again = compare(curves("sub_a", *rows_a), curves("sub_b", *rows_b), SETTINGS, sigma_seed=0.01)
    shuffled = compare(curves("sub_a", *rows_a[::-1]), curves("sub_b", rows_b[1], rows_b[2], rows_b[0]), SETTINGS,
                       sigma_seed=0.01)
    assert first == again == shuffled


def test_too_few_decided_chunks_is_a_tie():
    rng = np.random.default_rng(5)
    shared = learning_curve(1.2, rng, noise=0.0)
    better_in_few = list(shared)
    for index in range(SETTINGS.min_decided_chunks - 1):
        better_in_few[index] -= 0.5  # large, but in too few chunks
    verdict = compare(curves("sub_a", shared), curves("sub_b", better_in_few), SETTINGS, sigma_seed=0.0)
    assert verdict.outcome == "tied" and verdict.decided_chunks == SETTINGS.min_decided_chunks - 1
    assert "dead zone" in verdict.why


def test_only_the_same_byte_span_is_paired():
    a = curves("sub_a", [1.0] * CHUNKS, span=200_000)
    assert not comparable(a, curves("sub_b", [1.0] * CHUNKS, span=100_000))
    assert not comparable(a, curves("sub_b", [1.0] * (CHUNKS // 2)))
    with pytest.raises(ValueError, match="paired"):
        compare(a, curves("sub_b", [1.0] * CHUNKS, span=1), SETTINGS, 0.0)


def test_the_block_bootstrap_respects_autocorrelation_where_an_iid_one_is_overconfident():
    """AR(1) differences with mean 0 and φ = 0.9: an iid bootstrap's 99% bound excludes 0 far more often than 1% of
    the time; blocks keep the neighbours together and stay close to the nominal rate."""
    rng = np.random.default_rng(6)
    size, phi, trials = 256, 0.9, 300
    false = {1: 0, 16: 0}
    for _ in range(trials):
        shocks = rng.standard_normal(size)
        series = np.empty(size)
        series[0] = shocks[0] / math.sqrt(1 - phi * phi)
        for index in range(1, size):
            series[index] = phi * series[index - 1] + shocks[index]
        for block in false:
            means = block_bootstrap_means(series, block, 1000, seed=7)
            false[block] += np.quantile(means, 0.01) > 0 or np.quantile(means, 0.99) < 0
    iid_rate, block_rate = false[1] / trials, false[16] / trials
    assert iid_rate > 0.3  # nominal: 0.02
    assert block_rate < iid_rate / 3


def test_pooled_sigma_and_when_it_replaces_the_prior():
    sigma, dof = pooled_sigma([[1.0, 1.02], [1.5, 1.49, 1.51], [2.0]])
    assert dof == 3
    assert sigma == pytest.approx(math.sqrt((0.0002 + 0.0002) / 3))
    assert pooled_sigma([[1.0], []]) == (None, 0)
    assert sigma_to_use(sigma, dof, SETTINGS) == SETTINGS.seed_sigma_prior  # 3 < min_sigma_dof
    assert sigma_to_use(0.005, SETTINGS.min_sigma_dof, SETTINGS) == 0.005
