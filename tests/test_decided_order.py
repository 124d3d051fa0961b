"""The decided order and the weights modes built on it (docs/scoring.md, "The decided order", "Weights")."""

from __future__ import annotations

import itertools
import zlib

import numpy as np
import pytest

from prism_ray.config import ScoringSettings
from prism_ray.ranking.leaderboard import ScoreRow, leaderboard, seed_noise, verdict_against_leader, waiting, weights

CHUNKS = ScoringSettings().ranking.chunks
BASE = 1.1 + 1.5 * np.exp(-np.arange(CHUNKS) / 10.0)


def run(shift: float, seed: int) -> tuple[float, ...]:
    """A seed run of a learner whose curve sits `shift` bpb off the base curve, with its own chunk noise."""
    return tuple(BASE + shift + 0.01 * np.random.default_rng(seed).standard_normal(CHUNKS))


def row(submission_id: str, hotkey: str, shift: float, at: float, seeds: int = 1, replicas: str | None = None,
        audit: str | None = None, spread: float = 0.0) -> ScoreRow:
    """`seeds` seed runs, each offset by a multiple of `spread` (the seed noise)."""
    curves = tuple(tuple(np.asarray(run(shift + spread * (k - (seeds - 1) / 2), zlib.crc32(f"{submission_id}:{k}".encode()))))
                   for k in range(seeds))
    bpbs = tuple(float(np.mean(curve)) for curve in curves)
    return ScoreRow(submission_id=submission_id, hotkey=hotkey, submitted_at=at, status="completed",
                    final_score=1 / (1 + bpbs[0]), bpb=bpbs[0], chunk_span=200_000, chunk_bpb=curves,
                    seed_bpbs=bpbs, replicas=replicas, audit=audit)


def ids(board) -> list[str]:
    return [entry.submission_id for entry in board]


def test_two_bundles_within_the_seed_noise_are_tied_and_the_earlier_ranks_first_and_is_paid():
    earlier = row("sub_early", "alice", 0.0, at=10)
    later = row("sub_late", "bob", -0.015, at=20)  # lower bpb, by about σ_seed
    assert later.final_score > earlier.final_score * 1.005  # ε alone would let it pass
    board = leaderboard([later, earlier])
    assert ids(board) == ["sub_early", "sub_late"] and board[1].tied_with == 1
    for mode in ("per_hotkey", "winner_take_all", "ranked"):
        assert weights([earlier, later], ScoringSettings(weights_mode=mode)) == {"alice": 1.0}, mode


def test_a_clearly_better_bundle_takes_the_lead_only_after_its_replicas_ran():
    leader = row("sub_lead", "alice", 0.0, at=10, seeds=3, replicas="done", spread=0.004)
    pending = row("sub_new", "bob", -0.08, at=20, replicas="pending")
    assert ids(leaderboard([leader, pending])) == ["sub_lead", "sub_new"]
    assert waiting([leader, pending]) == {"audits": [], "replicas": ["sub_new"]}
    done = row("sub_new", "bob", -0.08, at=20, seeds=3, replicas="done", spread=0.004)
    board = leaderboard([leader, done])
    assert ids(board) == ["sub_new", "sub_lead"] and board[1].tied_with is None
    assert weights([leader, done], ScoringSettings(weights_mode="winner_take_all")) == {"bob": 1.0}


def test_without_replicas_anywhere_a_clear_improvement_passes_on_the_prior():
    board = leaderboard([row("sub_a", "alice", 0.0, at=10), row("sub_b", "bob", -0.1, at=20)])
    assert ids(board) == ["sub_b", "sub_a"]


def test_ranked_pays_a_decaying_share_per_decided_place_and_nothing_to_the_tied():
    rows = [row("sub_1", "h1", 0.0, at=1), row("sub_2", "h2", 0.003, at=2), row("sub_3", "h3", 0.1, at=3),
            row("sub_4", "h4", 0.2, at=4)]
    board = leaderboard(rows)
    assert ids(board) == ["sub_1", "sub_2", "sub_3", "sub_4"]
    assert [entry.tied_with for entry in board] == [None, 1, None, None]
    assert weights(rows, ScoringSettings(weights_mode="ranked")) == pytest.approx({"h1": 0.5, "h3": 0.25, "h4": 0.25})
    assert weights(rows, ScoringSettings(weights_mode="ranked", ranked_decay=0.25)) == pytest.approx(
        {"h1": 0.75, "h3": 0.1875, "h4": 0.0625})
    per_hotkey = weights(rows)
    assert "h2" not in per_hotkey and per_hotkey["h1"] == pytest.approx(
        rows[0].final_score / sum(r.final_score for r in (rows[0], rows[2], rows[3])))
    assert weights(rows, ScoringSettings(weights_mode="winner_take_all")) == {"h1": 1.0}


def test_weights_modes_fall_back_to_epsilon_without_paired_data():
    plain = [ScoreRow(submission_id=f"sub_{n}", hotkey=f"h{n}", submitted_at=n, status="completed", final_score=score)
             for n, score in ((1, 0.5), (2, 0.501), (3, 0.4))]
    board = leaderboard(plain)
    assert ids(board) == ["sub_1", "sub_2", "sub_3"] and board[1].tied_with == 1 and board[2].tied_with is None
    assert weights(plain, ScoringSettings(weights_mode="ranked")) == pytest.approx({"h1": 0.5, "h3": 0.5})
    assert weights(plain, ScoringSettings(weights_mode="per_hotkey")) == pytest.approx({"h1": 0.5 / 0.9,
                                                                                        "h3": 0.4 / 0.9})


def test_only_earning_rows_are_paid_and_pending_audits_are_listed():
    leader = row("sub_a", "alice", -0.2, at=1, audit="pending")
    second = row("sub_b", "bob", 0.0, at=2, audit="passed")
    assert weights([leader, second], ScoringSettings(weights_mode="winner_take_all")) == {"bob": 1.0}
    assert waiting([leader, second])["audits"] == ["sub_a"]


def test_the_decided_order_does_not_depend_on_row_order():
    rows = [row("sub_1", "h1", 0.0, at=1), row("sub_2", "h2", 0.003, at=2), row("sub_3", "h3", -0.1, at=3),
            row("sub_4", "h4", -0.1, at=3), row("sub_5", "h5", 0.05, at=0)]
    first = [(entry.submission_id, entry.tied_with) for entry in leaderboard(rows)]
    for permutation in itertools.permutations(rows):
        assert [(entry.submission_id, entry.tied_with) for entry in leaderboard(permutation)] == first


def test_the_measured_sigma_replaces_the_prior_once_replicas_give_enough_freedom():
    incumbent = row("sub_0", "h0", 0.0, at=0, seeds=2, replicas="done", spread=0.0005)
    challenger = row("sub_c", "hc", -0.008, at=9, seeds=2, replicas="done", spread=0.0005)
    others = [row(f"sub_{n}", f"h{n}", 0.1 * n, at=n, seeds=3, replicas="done", spread=0.0005) for n in (1, 2)]
    # Two seeds each: 2 degrees of freedom, fewer than min_sigma_dof, so the 0.012 prior holds and 0.008 is noise.
    assert ids(leaderboard([incumbent, challenger]))[0] == "sub_0"
    # Two more replicated entries: 6 degrees of freedom measure σ_seed ≈ 0.0007, and 0.008 is decided.
    assert ids(leaderboard([incumbent, challenger, *others]))[0] == "sub_c"


def test_entries_show_mean_spread_seeds_cost_and_the_verdict_against_the_leader():
    leader = row("sub_a", "alice", -0.1, at=1, seeds=3, replicas="done", spread=0.01).model_copy(
        update={"model_params": 1_000_000, "tokens": 50_000, "gpu_seconds": 36.0, "tokens_per_second": 4000.0})
    other = row("sub_b", "bob", 0.0, at=2)
    first, second = leaderboard([leader, other])
    assert (first.seeds, second.seeds) == (3, 1) and second.spread_bpb is None
    assert first.mean_bpb == pytest.approx(np.mean(leader.seed_bpbs))
    assert first.spread_bpb == pytest.approx(np.std(leader.seed_bpbs, ddof=1))
    assert first.est_flops == 6 * 1_000_000 * 50_000 and second.est_flops is None
    top, verdict = verdict_against_leader([leader, other], "sub_b")
    assert top.submission_id == "sub_a" and verdict.outcome == "worse" and verdict.seeds == (3, 1)
    assert verdict_against_leader([leader, other], "sub_a") is None
    noise = seed_noise([leader, other])
    assert noise.dof == 2 and noise.used == ScoringSettings().ranking.seed_sigma_prior and noise.measured > 0
