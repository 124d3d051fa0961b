"""Paired significance (docs/scoring.md, "The decided order"): is one run better than another by more than the noise,
judged on their nats over the same byte chunks of the scored stream? Pure numpy and deterministic: the bootstrap's
seed is pinned and the pair is put in a canonical order, so any two validators reach the same verdict, and
compare(a, b) is the mirror of compare(b, a)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from prism_ray.config import RankingSettings


class Curves(BaseModel):
    """One submission's runs as chunk curves: one row of chunk bpb per seed, chunks in stream order."""

    model_config = ConfigDict(frozen=True)

    key: str = Field(description="the submission id: puts a pair in a canonical order")
    span: int = Field(description="bytes of the stream the chunks cover; only equal spans are compared")
    chunk_bpb: tuple[tuple[float, ...], ...]

    @property
    def seeds(self) -> int:
        return len(self.chunk_bpb)


class Verdict(BaseModel):
    """The challenger against the incumbent. `improvement_bpb` > 0: the challenger's bpb is lower."""

    outcome: Literal["better", "worse", "tied"]
    improvement_bpb: float
    lower_bpb: float = Field(description="the improvement's lower confidence bound")
    upper_bpb: float = Field(description="the improvement's upper confidence bound")
    confidence: float
    decided_chunks: int
    chunks: int
    seeds: tuple[int, int] = Field(description="(incumbent's, challenger's)")
    sigma_seed: float
    why: str


def comparable(a: Curves, b: Curves) -> bool:
    """Paired data exists: the same byte span cut into the same chunks, at least one seed each."""
    width = {len(row) for row in (*a.chunk_bpb, *b.chunk_bpb)}
    return a.span == b.span and len(width) == 1 and a.seeds > 0 and b.seeds > 0


def compare(incumbent: Curves, challenger: Curves, settings: RankingSettings, sigma_seed: float) -> Verdict:
    """Better when the improvement's lower bound (at `confidence`) clears the dead zone and enough chunks are outside
    it; worse for the mirror; tied otherwise. The bootstrap resamples blocks of chunks (the same blocks for both
    sides: paired) and adds each side's seed noise, sigma_seed² / its seeds, as a normal draw."""
    if not comparable(incumbent, challenger):
        raise ValueError("no paired data: the two runs' chunks do not cover the same bytes")
    flip = challenger.key < incumbent.key  # computed in canonical order (first, second), then mirrored if needed
    first, second = (challenger, incumbent) if flip else (incumbent, challenger)
    diff = _mean_curve(first) - _mean_curve(second)  # per chunk, > 0: the second is better
    noise = sigma_seed * math.sqrt(1.0 / first.seeds + 1.0 / second.seeds)
    counts, normals = _plan(diff.size, settings.block_chunks, settings.resamples, settings.bootstrap_seed)
    means = counts @ diff / diff.size + noise * normals
    alpha = 1.0 - settings.confidence
    low, high = (float(bound) for bound in np.quantile(means, (alpha, 1.0 - alpha)))
    point = float(diff.mean())
    decided = int(np.count_nonzero(np.abs(diff) > settings.dead_zone_bpb))
    if flip:
        point, low, high = -point, -high, -low
    if decided < settings.min_decided_chunks:
        outcome, why = "tied", (f"only {decided} of {diff.size} chunks differ by more than the dead zone "
                                f"({settings.dead_zone_bpb:g} bpb); {settings.min_decided_chunks} are needed")
    elif low > settings.dead_zone_bpb:
        outcome, why = "better", (f"the challenger is lower by {point:.4f} bpb, at least {low:.4f} with "
                                  f"{settings.confidence:.0%} confidence")
    elif high < -settings.dead_zone_bpb:
        outcome, why = "worse", (f"the challenger is higher by {-point:.4f} bpb, at least {-high:.4f} with "
                                 f"{settings.confidence:.0%} confidence")
    else:
        outcome, why = "tied", (f"the difference, {point:+.4f} bpb, lies within [{low:+.4f}, {high:+.4f}] at "
                                f"{settings.confidence:.0%} confidence, which does not clear the dead zone")
    return Verdict(outcome=outcome, improvement_bpb=point, lower_bpb=low, upper_bpb=high,
                   confidence=settings.confidence, decided_chunks=decided, chunks=int(diff.size),
                   seeds=(incumbent.seeds, challenger.seeds), sigma_seed=sigma_seed, why=why)


def block_bootstrap_means(series: np.ndarray, block: int, resamples: int, seed: int) -> np.ndarray:
    """Means of circular block-bootstrap resamples of `series` (block = 1: the iid bootstrap). Blocks of neighbours
    keep the series' autocorrelation, which an iid bootstrap would destroy (and so be overconfident)."""
    counts, _ = _plan(series.size, block, resamples, seed)
    return counts @ series / series.size


@lru_cache(maxsize=8)
def _plan(size: int, block: int, resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The resamples, drawn once per configuration (the seed is pinned, so every pair gets the same ones): how
    often each chunk is drawn in each resample, and one standard normal per resample for the seed noise. A verdict
    is then a matrix-vector product."""
    rng = np.random.default_rng(seed)
    block = max(1, min(block, size))
    starts = rng.integers(0, size, size=(resamples, -(-size // block)))
    index = (starts[:, :, None] + np.arange(block)[None, None, :]).reshape(resamples, -1)[:, :size] % size
    counts = np.zeros((resamples, size))
    np.add.at(counts, (np.arange(resamples)[:, None], index), 1.0)
    counts.flags.writeable = False
    normals = rng.standard_normal(resamples)
    normals.flags.writeable = False
    return counts, normals


def pooled_sigma(groups: Sequence[Sequence[float]]) -> tuple[float | None, int]:
    """The pooled within-entry standard deviation of bpb across seeds, and its degrees of freedom (seeds minus
    entries, over the entries with at least two seeds); (None, 0) when nothing was replicated."""
    squares, dof = 0.0, 0
    for values in groups:
        if len(values) < 2:
            continue
        mean = math.fsum(values) / len(values)
        squares += math.fsum((value - mean) ** 2 for value in values)
        dof += len(values) - 1
    return (math.sqrt(squares / dof), dof) if dof else (None, 0)


def sigma_to_use(measured: float | None, dof: int, settings: RankingSettings) -> float:
    """The epoch's measured σ_seed once it has enough degrees of freedom, else the prior."""
    return measured if measured is not None and dof >= settings.min_sigma_dof else settings.seed_sigma_prior


def _mean_curve(curves: Curves) -> np.ndarray:
    """The seeds' mean curve, with the seeds in a canonical order so the float sums never depend on row order."""
    rows = sorted(curves.chunk_bpb)
    return np.asarray(rows, dtype=np.float64).mean(axis=0)
