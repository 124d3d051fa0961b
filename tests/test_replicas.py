"""Seed replicas in the store, on a real DuckDB file (docs/scoring.md, "Seed replicas"): who gets them (each epoch's
top k and whoever would enter it), secret seeds revealed when the epoch closes, their queue's leases, and the decided
order they feed: a challenger within the noise stays tied below the earlier entry, a clearly better one takes the
lead only after its replicas ran. The re-runs themselves are played here as the scheduler would hand them back."""

from __future__ import annotations

import math
import zlib

import duckdb
import numpy as np
import pytest

from prism_ray.config import AuditSettings, ReplicaSettings, ScoringSettings
from prism_ray.errors import Reason
from prism_ray.evaluation.chunks import ChunkCurve, chunk_edges
from prism_ray.evaluation.report import RunReport
from prism_ray.intake.bundle import Bundle, check_contract
from prism_ray.ranking import replicas
from prism_ray.ranking.leaderboard import ScoreRow, epoch_of, leaderboard, waiting, weights
from prism_ray.store import Store

CHUNKS = ScoringSettings().ranking.chunks
SPAN = 200_000
BASE = 1.1 + 1.5 * np.exp(-np.arange(CHUNKS) / 10.0)
SECRET = "operator-secret"
NOISE_DRAW = 1


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def bundle(tag: str) -> Bundle:
    return check_contract({"architecture.py": f"def build_model(ctx):\n    return {tag!r}\n".encode(),
                           "training.py": f"def train(ctx):\n    return {tag!r}\n".encode()})


def report(shift: float, seed: int, status: str = "completed", noise: int | None = None) -> RunReport:
    """A run of a learner `shift` bpb off the base curve; the seed (or `noise`, where a test needs the same draw
    every time) moves it by up to ±0.02 bpb (σ ≈ 0.012) and adds its own chunk noise (the seed noise of an honest
    bundle)."""
    if status != "completed":
        return RunReport(status=status, stage="train", seed=seed, reasons=[Reason(rule="run:crash", message="x")])
    rng = np.random.default_rng(seed if noise is None else noise)
    bpb_curve = BASE + shift + rng.uniform(-0.02, 0.02) + 0.01 * rng.standard_normal(CHUNKS)
    edges = chunk_edges(SPAN, CHUNKS)
    sizes = [edges[i + 1] - edges[i] for i in range(CHUNKS)]
    nats = [float(bpb * math.log(2) * size) for bpb, size in zip(bpb_curve, sizes, strict=True)]
    bpb = math.fsum(nats) / math.log(2) / SPAN
    return RunReport(status="completed", stage="score", bpb=bpb, final_score=1 / (1 + bpb), seed=seed,
                     byte_budget=SPAN, device="cpu", train_seconds=12.5, tokens_per_second=4000.0,
                     model_params=1_000_000, tokens_scored=50_000, chunks=ChunkCurve(span=SPAN, nats=nats,
                                                                                      bytes=sizes))


class Cluster:
    def __init__(self, tmp_path, clock: Clock, **replica_settings) -> None:
        self.clock = clock
        self.settings = ReplicaSettings(secret=SECRET, **replica_settings)
        self.store = Store(tmp_path / "prism.duckdb", clock=clock, audit=AuditSettings(mode="off"),
                           replicas=self.settings)
        self.shifts: dict[str, float] = {}

    def scored(self, hotkey: str, shift: float) -> str:
        self.clock.now += 60
        record = self.store.create_submission(hotkey, f"{hotkey}.zip", bundle(f"{hotkey}{shift}"))
        [claimed] = self.store.claim_next("sched", 60)
        run = report(shift, 1337)
        assert self.store.complete(claimed.id, "sched", run)
        self.shifts[record.id] = shift
        return record.id

    def run_replicas(self) -> list[str]:
        """Claim every pending replica and hand back its run under its own seed. The seeds come from the random
        submission ids, so the noise is drawn from the shift and the replica's place instead: the same draw every
        time (NOISE_DRAW picks one where a 0.015 bpb lead is within the noise; about one draw in seven decides it)."""
        ran = []
        for item in self.store.claim_replicas("sched", 60, limit=100):
            shift = self.shifts[item.submission_id]
            noise = zlib.crc32(f"{shift}:{ran.count(item.submission_id)}:{NOISE_DRAW}".encode())
            assert self.store.finish_replica(item.id, "sched", report(shift, item.seed, noise=noise))
            ran.append(item.submission_id)
        return ran

    def rows(self) -> list[ScoreRow]:
        return self.store.scored_rows()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_within_the_noise_the_earlier_keeps_the_lead_and_a_clearly_better_one_takes_it_after_its_replicas(
        tmp_path, clock):
    cluster = Cluster(tmp_path, clock, top_k=2, count=2)
    alice = cluster.scored("alice", 0.0)
    bob = cluster.scored("bob", -0.015)  # lower by more than ε asks, by less than the seed noise
    first_runs = {row.hotkey: row.final_score for row in cluster.rows()}
    assert first_runs["bob"] > first_runs["alice"] * (1 + ScoringSettings().priority_epsilon)
    assert {item.submission_id for item in cluster.store.list_replicas()} == {alice, bob}
    assert sorted(cluster.run_replicas()) == sorted([alice, alice, bob, bob])
    rows = cluster.rows()
    assert [len(row.seed_bpbs) for row in rows] == [3, 3] and all(row.replicas == "done" for row in rows)
    board = leaderboard(rows)
    assert [entry.hotkey for entry in board] == ["alice", "bob"] and board[1].tied_with == 1
    for mode in ("per_hotkey", "winner_take_all", "ranked"):
        assert weights(rows, ScoringSettings(weights_mode=mode)) == {"alice": 1.0}

    carol = cluster.scored("carol", -0.1)  # clearly better, but no replicas yet: an entrant
    [pending] = {item.why for item in cluster.store.list_replicas(submission_id=carol)}
    assert pending == "entrant"
    rows = cluster.rows()
    assert [entry.hotkey for entry in leaderboard(rows)] == ["alice", "bob", "carol"]
    assert waiting(rows) == {"audits": [], "replicas": [carol]}
    assert weights(rows, ScoringSettings(weights_mode="winner_take_all")) == {"alice": 1.0}
    assert cluster.run_replicas() == [carol, carol]
    rows = cluster.rows()
    assert [entry.hotkey for entry in leaderboard(rows)] == ["carol", "alice", "bob"]
    assert weights(rows, ScoringSettings(weights_mode="winner_take_all")) == {"carol": 1.0}
    assert weights(rows, ScoringSettings(weights_mode="ranked")) == pytest.approx({"carol": 0.5, "alice": 0.5})


def test_seeds_are_secret_until_the_epoch_closes_then_anyone_can_check_them(tmp_path, clock):
    cluster = Cluster(tmp_path, clock, top_k=1, count=2)
    alice = cluster.scored("alice", 0.0)
    epoch = epoch_of(clock.now)
    listed = cluster.store.list_replicas()
    assert len(listed) == 2 and all(item.seed is None for item in listed)
    assert cluster.store.epoch_secret(epoch) is None
    claimed = cluster.store.claim_replicas("sched", 60, limit=2)
    secret = replicas.epoch_secret(cluster.settings, epoch)
    assert [item.seed for item in claimed] == [replicas.replica_seed(secret, alice, r) for r in (1, 2)]
    assert len({item.seed for item in claimed} | {1337}) == 3
    assert cluster.store.finish_replica(claimed[0].id, "sched", report(0.0, claimed[0].seed))
    cluster.store.export_parquet(tmp_path / "open")
    with duckdb.connect() as con:
        assert con.execute(f"SELECT count(*) FROM '{tmp_path / 'open' / 'epoch_secrets.parquet'}'").fetchone() == (0,)
        assert con.execute(f"SELECT count(seed) FROM '{tmp_path / 'open' / 'replicas.parquet'}'").fetchone() == (0,)
        assert con.execute(f"SELECT count(seed) FROM '{tmp_path / 'open' / 'seed_runs.parquet'}'").fetchone() == (1,)
        seeds = con.execute(f"SELECT report->>'seed' FROM '{tmp_path / 'open' / 'runs.parquet'}' "
                            "WHERE starts_with(submission_id, 'rep_') AND report IS NOT NULL").fetchall()
        assert seeds == [(None,)]  # the replica's report, its seed taken out
    clock.now += 86_400
    assert cluster.store.epoch_secret(epoch) == secret
    assert [item.seed for item in cluster.store.list_replicas()] == [item.seed for item in claimed]
    other = Cluster(tmp_path / "other", clock, top_k=1, count=2)  # another secret gives other seeds
    other.settings = ReplicaSettings(secret="another")
    assert replicas.replica_seed(replicas.epoch_secret(other.settings, epoch), alice, 1) != claimed[0].seed


def test_replicas_are_queue_items_with_leases_capped_retries_and_failures(tmp_path, clock):
    (tmp_path / "a").mkdir()
    cluster = Cluster(tmp_path / "a", clock, top_k=1, count=2, max_attempts=1)
    alice = cluster.scored("alice", 0.0)
    first, second = cluster.store.claim_replicas("sched", 30, limit=2)
    assert cluster.store.replica_stats()["in_flight"] == 2
    assert cluster.store.renew_lease(first.id, "sched", 30, progress_bytes=100, attempt=1)
    clock.now += 31
    assert sorted(cluster.store.requeue_expired()) == sorted([first.id, second.id])
    assert cluster.store.get_replica(first.id).reasons[0].rule == "infra:attempts_exhausted"
    assert [event.kind for event in cluster.store.events(first.id)] == ["claimed", "failed"]
    [row] = cluster.rows()
    assert row.replicas == "done" and row.seed_bpbs == (row.bpb,)  # the score stands on the seed it has
    assert not cluster.store.finish_replica(first.id, "sched", report(0.0, 1))  # a late result changes nothing

    (tmp_path / "b").mkdir()
    crashing = Cluster(tmp_path / "b", clock, top_k=1, count=1)
    bob = crashing.scored("bob", 0.0)
    [item] = crashing.store.claim_replicas("sched", 30)
    ended = crashing.store.finish_replica(item.id, "sched", report(0.0, 1, status="failed"))
    # Code that crashes under a seed it was not published could refuse every replica: the score goes.
    assert ended.status == "failed" and ended.reasons[0].rule == "replica:seed_failed"
    assert "run:crash" in ended.reasons[0].message and str(item.seed) not in ended.reasons[0].message
    assert crashing.store.get_submission(bob).status == "failed" and crashing.rows() == []
    assert crashing.store.events(bob)[-1].kind == "invalidated"

    (tmp_path / "c").mkdir()
    stopped = Cluster(tmp_path / "c", clock, top_k=1, count=1)
    carol = stopped.scored("carol", 0.0)
    [item] = stopped.store.claim_replicas("sched", 30)
    killed = RunReport(status="failed", stage="train", seed=item.seed,
                       reasons=[Reason(rule="infra:runner_killed", message="killed from outside")])
    ended = stopped.store.finish_replica(item.id, "sched", killed)
    assert ended.status == "failed" and ended.reasons[0].rule == "replica:not_completed"  # the system's: it stands
    assert stopped.store.get_submission(carol).status == "completed" and len(stopped.rows()) == 1
    assert alice  # each store keeps its own replicas


def test_with_replicas_off_nothing_is_queued_and_rows_carry_no_state(tmp_path, clock):
    cluster = Cluster(tmp_path, clock, mode="off")
    cluster.scored("alice", 0.0)
    assert cluster.store.list_replicas() == [] and cluster.store.claim_replicas("sched", 60) == []
    [row] = cluster.rows()
    assert row.replicas is None and row.chunk_span == SPAN and len(row.chunk_bpb) == 1
