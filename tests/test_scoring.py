"""final_score (docs/scoring.md): the bounded tie-break, the early-batch anomaly, the gap penalty, the plausibility
gate, degenerate runs."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prism_ray.config import ScoringSettings
from prism_ray.evaluation.scoring import (
    ScoreError,
    ScoreInputs,
    bits_per_byte,
    final_score,
    gap_penalty,
    is_step0_anomaly,
)

SETTINGS = ScoringSettings()
EPSILON = SETTINGS.epsilon
GPT2_VOCAB = 50257
LN_V = math.log(GPT2_VOCAB)


def score(bpb: float, delta: float | None = 0.0, gap: float | None = 0.0, step0: float | None = LN_V,
          vocab: int = GPT2_VOCAB, settings: ScoringSettings = SETTINGS):
    inputs = ScoreInputs(bpb=bpb, vocab_size=vocab, step0_loss=step0, heldout_delta=delta, gap=gap)
    return final_score(inputs, settings)


deltas = st.floats(min_value=-1e6, max_value=1e300, allow_nan=False)


@given(bpb=st.floats(min_value=0.0, max_value=100.0), distance=st.floats(min_value=EPSILON, max_value=50.0),
       better_delta=deltas, worse_delta=deltas, gap=st.floats(min_value=-1.0, max_value=5.0))
def test_tie_break_never_reorders_runs_epsilon_or_more_apart(bpb, distance, better_delta, worse_delta, gap):
    # Equal penalties (the same gap), any held-out deltas, bpb far past 16: the better bpb always wins outright.
    better = score(bpb, delta=better_delta, gap=gap)
    worse = score(bpb + distance, delta=worse_delta, gap=gap)
    assert better.final_score > worse.final_score


@given(bpb=st.floats(min_value=0.0, max_value=100.0), delta=deltas)
def test_tie_break_is_bounded_by_the_epsilon_secant(bpb, delta):
    result = score(bpb, delta=delta)
    assert 0.0 <= result.tie_break < 1.0 / (1.0 + bpb - EPSILON) - 1.0 / (1.0 + bpb)
    assert result.final_score == pytest.approx(result.base + result.tie_break, rel=1e-12)


@pytest.mark.parametrize("bpb", [0.0, 1.0, 3.5, 20.0])
def test_tie_break_reorders_close_runs_by_heldout_delta(bpb):
    slightly_better = score(bpb, delta=0.0)
    slightly_worse_learns_more = score(bpb + EPSILON / 2, delta=2.0)
    assert slightly_worse_learns_more.final_score > slightly_better.final_score


def test_tie_break_grows_with_the_delta_and_ignores_regressions():
    breaks = [score(1.0, delta=delta).tie_break for delta in (-3.0, 0.0, 0.1, 1.0, 10.0)]
    assert breaks[0] == breaks[1] == 0.0
    assert breaks[1] < breaks[2] < breaks[3] < breaks[4]


def test_step0_anomaly_zeroes_the_score():
    result = score(0.5, delta=3.0, step0=0.5 * LN_V)
    assert result.anomaly == 0 and result.final_score == 0.0
    assert "step0_anomaly" in result.flags
    assert result.base > 0  # the breakdown still shows what was zeroed


@pytest.mark.parametrize("step0", [LN_V, LN_V + 0.4, 0.95 * LN_V, 0.9 * LN_V, float("nan"), float("inf")])
def test_ordinary_initialisations_are_not_anomalies(step0):
    # step0 == ln V exactly is a zero-initialised output layer (uniform logits); NaN/inf are charged upstream.
    result = score(1.2, step0=step0)
    assert result.anomaly == 1 and result.final_score > 0
    assert not is_step0_anomaly([step0], GPT2_VOCAB, SETTINGS)


def test_anomaly_fraction_comes_from_settings():
    assert is_step0_anomaly([0.95 * math.log(257)], 257, ScoringSettings(anomaly_fraction=0.99))
    assert not is_step0_anomaly([0.95 * math.log(257)], 257, SETTINGS)


def test_a_prior_written_in_after_the_first_batch_is_an_anomaly():
    """Uniform on batch 0, then a smuggled prior from step 1: the check covers the first batches, not only the first."""
    early = [LN_V, 0.7 * LN_V, 0.6 * LN_V]
    assert is_step0_anomaly(early, GPT2_VOCAB, SETTINGS)
    inputs = ScoreInputs(bpb=1.0, vocab_size=GPT2_VOCAB, step0_loss=LN_V, early_losses=early, heldout_delta=0.5,
                         gap=0.0)
    result = final_score(inputs, SETTINGS)
    assert result.final_score == 0.0 and "step0_anomaly" in result.flags
    # a fast honest learner (examples/byte-lm: 5.57, 5.34, 5.18, 4.92 nats on bytes) stays above the decaying floor,
    # and past the batches the check covers, learning fast is just learning
    assert not is_step0_anomaly([5.567, 5.343, 5.183, 4.922], 257, SETTINGS)
    late = [LN_V] * SETTINGS.anomaly_batches + [0.5 * LN_V]
    assert not is_step0_anomaly(late, GPT2_VOCAB, SETTINGS)


@pytest.mark.parametrize("changes,rule", [
    ({"bpb": 1.0, "val_bpb_trained": 1.6}, "plausibility:prequential_below_heldout"),
    ({"step0_loss": 0.4 * LN_V, "early_losses": [LN_V]}, "plausibility:impossible_loss"),
    ({"scored_batches": 9, "planned_batches": 10}, "plausibility:count_mismatch"),
])
def test_implausible_runs_score_zero_with_a_typed_flag(changes, rule):
    honest = {"bpb": 1.5, "vocab_size": GPT2_VOCAB, "step0_loss": LN_V, "early_losses": [LN_V], "heldout_delta": 0.3,
              "gap": 0.0, "val_bpb_trained": 1.4, "scored_batches": 10, "planned_batches": 10}
    assert final_score(ScoreInputs(**honest), SETTINGS).plausible == 1
    result = final_score(ScoreInputs(**{**honest, **changes}), SETTINGS)
    assert result.plausible == 0 and result.final_score == 0.0
    assert rule in result.flags and [r.rule for r in result.implausible] == [rule]
    assert result.base > 0  # never silently clipped: the breakdown shows what was zeroed


def test_gap_penalty_demotes_a_memoriser_not_an_honest_learner():
    honest = score(1.00, delta=1.0, gap=0.02)
    memoriser = score(0.80, delta=1.5, gap=1.0)
    assert honest.penalty == 1.0 and "memorisation_gap" not in honest.flags
    assert memoriser.penalty == SETTINGS.gap_penalty_floor and "memorisation_gap" in memoriser.flags
    assert honest.final_score > memoriser.final_score


def test_gap_penalty_is_continuous_decreasing_and_floored():
    threshold, floor = SETTINGS.gap_threshold, SETTINGS.gap_penalty_floor
    assert gap_penalty(-0.5, SETTINGS) == gap_penalty(threshold, SETTINGS) == 1.0
    assert gap_penalty(threshold + 1e-9, SETTINGS) == pytest.approx(1.0)
    values = [gap_penalty(threshold + excess, SETTINGS) for excess in (0.01, 0.1, 0.3, 0.5, 5.0)]
    assert values == sorted(values, reverse=True) and values[0] < 1.0
    assert values[1] == pytest.approx(math.exp(-SETTINGS.gap_penalty_slope * 0.1))
    assert values[-1] == floor


def test_missing_heldout_is_flagged_and_neutral():
    result = score(1.0, delta=None, gap=None)
    assert result.tie_break == 0.0 and result.penalty == 1.0
    assert result.final_score == result.base == 0.5
    assert result.flags == ["no_heldout"]


@pytest.mark.parametrize("bpb", [float("nan"), float("inf"), -0.1, bits_per_byte(0.0, 0)])
def test_non_finite_bpb_is_degenerate(bpb):
    with pytest.raises(ScoreError) as raised:
        score(bpb)
    assert raised.value.rule == "score:degenerate"


@pytest.mark.parametrize("changes", [{"step0": None}, {"delta": float("nan")}, {"gap": float("inf")}, {"vocab": 1}])
def test_other_degenerate_runs(changes):
    with pytest.raises(ScoreError) as raised:
        score(1.0, **changes)
    assert raised.value.rule == "score:degenerate"


def test_settings_read_the_environment(monkeypatch):
    monkeypatch.setenv("PRISM_SCORING_EPSILON", "0.01")
    monkeypatch.setenv("PRISM_SCORING_TWO_TIER_SPLIT", "[0.7, 0.3]")
    settings = ScoringSettings()
    assert settings.epsilon == 0.01 and settings.two_tier_split == (0.7, 0.3)
    monkeypatch.setenv("PRISM_SCORING_TWO_TIER_SPLIT", "[0.7, 0.4]")
    with pytest.raises(ValueError):
        ScoringSettings()
