"""The parent's side of the causality probes (prism_ray/harness/probes.py), without runners: what a probe batch
holds, how often batches are probed, how drift is measured, and the detection bound docs/rules.md states."""

from __future__ import annotations

import numpy as np
import pytest

from prism_ray.harness.probes import ProbePlan, causality_tolerance, drift, escape_probability, probe_rows_per_batch
from prism_ray.harness.stream import StreamPlan

VOCAB = 50


@pytest.fixture
def plan() -> StreamPlan:
    tokens = np.random.default_rng(0).integers(0, VOCAB, 10_000).astype(np.int64)
    return StreamPlan(tokens, np.ones(VOCAB, dtype=np.int64), batch_size=4, seq_len=33, byte_budget=0)


def test_a_probe_batch_keeps_each_probe_rows_prefix_and_fills_the_rest_with_scored_text(plan):
    probes = ProbePlan(plan, every=1, vocab_size=VOCAB)
    for index in (0, 5, 20):
        piece = plan.batch(index)
        probe = probes.for_batch(piece)
        assert probe is not None and probe.index == index and probe.tokens.shape == (4, 33)
        assert len(probe.rows) == probe_rows_per_batch(4) == 2 and len({row for row, _ in probe.rows}) == 2
        past = plan.tokens[: index * plan.span] if index else piece.chunk
        text = past.tobytes()
        for row, boundary in probe.rows:
            real = piece.chunk[row * 32: row * 32 + 33]
            assert 1 <= boundary <= 32
            assert np.array_equal(probe.tokens[row, :boundary], real[:boundary])
            assert probe.tokens[row, boundary] != real[boundary]  # a peek at the next token shows
            assert probe.tokens[row, boundary:].astype(np.int64).tobytes() in text  # filler: scored past text
        for row in set(range(4)) - {row for row, _ in probe.rows}:
            assert probe.tokens[row].astype(np.int64).tobytes() in text


def test_the_first_batch_is_always_probed_and_later_ones_at_the_configured_rate(plan):
    probes = ProbePlan(plan, every=4, vocab_size=VOCAB)
    assert probes.for_batch(plan.batch(0)) is not None
    probed = sum(probes.for_batch(plan.batch(1 + k % 70)) is not None for k in range(2000))
    assert 400 < probed < 600  # one in four on average
    assert ProbePlan(plan, every=0, vocab_size=VOCAB).for_batch(plan.batch(0)) is None


def test_probed_rows_and_boundaries_vary(plan):
    probes = ProbePlan(plan, every=1, vocab_size=VOCAB)
    seen = {tuple(probes.for_batch(plan.batch(3)).rows) for _ in range(30)}
    assert len(seen) > 20


def test_drift_is_exact_and_treats_equal_minus_infinity_as_no_change():
    real = np.array([-1.0, -np.inf, -2.5])
    assert drift(real, real.copy()) == 0.0
    assert drift(real, real + np.array([0.0, 0.0, 1e-12])) == pytest.approx(1e-12)
    assert drift(real, np.array([-1.0, -1.0, -2.5])) == float("inf")
    assert drift(real, np.array([-1.0, -np.inf, np.nan])) == float("inf")


def test_tolerance_is_zero_on_cpu_and_follows_the_logits_dtype_on_a_gpu():
    assert causality_tolerance("float32", "cpu") == causality_tolerance("bfloat16", "cpu") == 0.0
    assert causality_tolerance("float32", "cuda") < causality_tolerance("float16", "cuda") \
        < causality_tolerance("bfloat16", "cuda")


def test_escape_probability_is_the_documented_bound():
    assert escape_probability(0.1, 132) < 1e-6 < escape_probability(0.1, 130)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 8])
def test_half_the_rows_are_filler_at_every_batch_size(batch_size):
    """A probe row's first token stays real, so another row's first token is seen changing only in a filler row."""
    assert probe_rows_per_batch(batch_size) == max(1, batch_size // 2)
    assert batch_size == 1 or batch_size - probe_rows_per_batch(batch_size) >= 1


def test_a_held_out_probe_batch_is_built_from_the_batch_itself():
    import secrets

    from prism_ray.harness.probes import heldout_probe

    tokens = np.random.default_rng(1).integers(0, VOCAB, (4, 33)).astype(np.int64)
    rows, probe = heldout_probe(tokens, secrets.SystemRandom(), VOCAB)
    assert probe.shape == tokens.shape and len(rows) == 2
    for row, boundary in rows:
        assert np.array_equal(probe[row, :boundary], tokens[row, :boundary])
        assert probe[row, boundary] != tokens[row, boundary]
