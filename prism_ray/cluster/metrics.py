"""Prometheus metrics through ray.util.metrics, so they show on the Ray dashboard (names: docs/operator.md).

Ray exports each one with a `ray_` prefix (e.g. `ray_prism_queue_depth`). Tags stay low-cardinality: statuses,
stage names and reason rules, never submission ids.
"""

from __future__ import annotations

from collections.abc import Mapping

from ray.util.metrics import Counter, Gauge, Histogram

from prism_ray.store import AUDIT_STATUSES, REPLICA_STATUSES, STATUSES

_SECONDS = [0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600]
_BPB = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0]


class StoreMetrics:
    """Written by the store actor, which sees every submission and every heartbeat."""

    def __init__(self) -> None:
        self.submissions = Gauge("prism_submissions", "submissions in the store, by status", tag_keys=("status",))
        self.queue_depth = Gauge("prism_queue_depth", "pending submissions waiting for a slot")
        self.trainings = Gauge("prism_trainings_running", "GPU stages reporting heartbeats")
        self.tokens_per_second = Gauge("prism_train_tokens_per_second",
                                       "summed tokens/s of the running trainings, from their last heartbeat")
        self.audits = Gauge("prism_audits", "re-execution audits in the store, by status", tag_keys=("status",))
        self.audit_queue_depth = Gauge("prism_audit_queue_depth", "audits waiting for a slot")
        self.replicas = Gauge("prism_replicas", "seed replicas in the store, by status", tag_keys=("status",))
        self.replica_queue_depth = Gauge("prism_replica_queue_depth", "seed replicas waiting for a slot")

    def record_stats(self, by_status: Mapping[str, int], audits_by_status: Mapping[str, int],
                     replicas_by_status: Mapping[str, int]) -> None:
        for status in STATUSES:
            self.submissions.set(by_status.get(status, 0), tags={"status": status})
        self.queue_depth.set(by_status.get("pending", 0))
        for status in AUDIT_STATUSES:
            self.audits.set(audits_by_status.get(status, 0), tags={"status": status})
        self.audit_queue_depth.set(audits_by_status.get("pending", 0))
        for status in REPLICA_STATUSES:
            self.replicas.set(replicas_by_status.get(status, 0), tags={"status": status})
        self.replica_queue_depth.set(replicas_by_status.get("pending", 0))

    def record_trainings(self, speeds: list[float]) -> None:
        self.trainings.set(len(speeds))
        self.tokens_per_second.set(sum(speeds))


class SchedulerMetrics:
    """Written by the scheduler actor: capacity, stage durations and how each attempt (and audit) ended."""

    def __init__(self) -> None:
        self.capacity = Gauge("prism_capacity", "submissions the scheduler keeps in flight at most")
        self.in_flight = Gauge("prism_in_flight", "submissions in flight (claimed, any stage)")
        self.stage_seconds = Histogram("prism_stage_seconds", "wall-clock seconds of each stage task",
                                       boundaries=_SECONDS, tag_keys=("stage",))
        self.outcomes = Counter("prism_outcomes_total", "attempts ended by the scheduler, by resulting status "
                                "(completed, failed, rejected, held, requeued)", tag_keys=("status",))
        self.failures = Counter("prism_failures_total", "failed, rejected, held and requeued attempts, by the rule "
                                "of their first reason", tag_keys=("rule",))
        self.bpb = Histogram("prism_bpb", "bits per byte of completed submissions", boundaries=_BPB)
        self.audits = Counter("prism_audit_outcomes_total", "audit attempts ended by the scheduler, by resulting "
                              "status (passed, mismatch, failed, requeued)", tag_keys=("status",))
        self.replicas = Counter("prism_replica_outcomes_total", "seed replica attempts ended by the scheduler, by "
                                "resulting status (completed, failed, requeued)", tag_keys=("status",))

    def record_end(self, status: str, rule: str | None) -> None:
        self.outcomes.inc(tags={"status": status})
        if rule is not None:
            self.failures.inc(tags={"rule": rule})
