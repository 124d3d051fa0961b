"""The parent's side of the causality probes (prism_ray/harness/probes.py), without runners: what a probe row holds,
how the desk pairs the scorer's and the prober's answers, and how drift is measured."""

from __future__ import annotations

import numpy as np
import pytest

from prism_ray.harness.probes import ProbeDesk, ProbeError, ProbePlan, drift
from prism_ray.harness.stream import StreamPlan

VOCAB = 50


@pytest.fixture
def plan() -> StreamPlan:
    tokens = np.random.default_rng(0).integers(0, VOCAB, 10_000).astype(np.int64)
    return StreamPlan(tokens, np.ones(VOCAB, dtype=np.int64), batch_size=4, seq_len=33, byte_budget=0)


def test_a_probe_row_keeps_the_prefix_and_fills_the_future_with_other_scored_text(plan):
    probes = ProbePlan(plan, rows_per_batch=2, vocab_size=VOCAB)
    for index in (0, 5, 20):
        piece = plan.batch(index)
        rows = probes.rows_for(piece)
        assert len(rows) == 2 and len({probe.row for probe in rows}) == 2
        for probe in rows:
            real = piece.chunk[probe.row * 32: probe.row * 32 + 33]
            assert 1 <= probe.boundary <= 32 and len(probe.tokens) == 34
            assert np.array_equal(probe.tokens[:probe.boundary], real[:probe.boundary])
            assert probe.tokens[probe.boundary] != real[probe.boundary]  # a peek at the next token shows
            assert probe.tokens[-1] == real[probe.boundary]  # the target at the boundary, for the prober


def test_the_desk_stages_one_probed_batch_at_a_time_and_pairs_each_answer(plan):
    probes, desk = ProbePlan(plan, rows_per_batch=2, vocab_size=VOCAB), ProbeDesk()
    first, second = probes.rows_for(plan.batch(0)), probes.rows_for(plan.batch(1))
    desk.add(first)
    desk.add(second)
    assert desk.next_batch() == first and desk.next_batch() is None  # the prober holds one snapshot
    with pytest.raises(ProbeError, match="were not asked for"):
        desk.scorer_row(1, second[0].row, np.zeros(32))
    scored = {probe.row: np.linspace(-3, -1, 32) for probe in first}
    assert desk.scorer_row(0, first[0].row, scored[first[0].row]) == []  # not all of the batch's rows yet
    assert desk.scorer_row(0, first[1].row, scored[first[1].row]) == first
    with pytest.raises(ProbeError, match="which was not probed"):
        desk.prober_row(1, second[0].row, np.zeros(3))
    probe, moved = desk.prober_row(0, first[0].row, scored[first[0].row][:first[0].boundary])
    assert probe == first[0] and moved == 0.0 and not desk.prober_free
    shifted = scored[first[1].row][:first[1].boundary] + 0.5
    assert desk.prober_row(0, first[1].row, shifted) == (first[1], pytest.approx(0.5))
    assert desk.prober_free and not desk.idle and desk.next_batch() == second


def test_drift_ignores_equal_impossible_targets_and_flags_malformed_answers():
    scored = np.array([-1.0, -np.inf, -2.0, -5.0])
    assert drift(scored, np.array([-1.0, -np.inf, -2.25]), boundary=3) == pytest.approx(0.25)
    assert drift(scored, np.array([-1.0, -2.0]), boundary=3) == float("inf")  # wrong length
    assert drift(scored, np.array([-1.0, -1.0, -2.0]), boundary=3) == float("inf")  # −∞ against a finite value
