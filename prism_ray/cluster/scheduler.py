"""The scheduler: claims queued submissions from the store and runs each as a chain of stage tasks (DESIGN §3).

The queue lives in the store, so the scheduler holds nothing that a restart could lose: on start it requeues every
`running` row (those attempts died with the previous scheduler, their tasks with it). A poll loop on a side thread
keeps at most `capacity` submissions in flight; each turn it renews the leases of its CPU-stage attempts, requeues
expired leases, claims up to the free capacity, harvests finished stages (waking as soon as one finishes) and
cuts stages that passed their wall-clock limit.

Failures are sorted by who caused them: a system failure (a node, worker or object lost) requeues the attempt,
explicitly and recorded, up to the store's attempt cap; an application failure (a failed report, a rejection) is
final and never retried; a stage over its limit is cancelled and fails `run:timeout` (GPU stages) or
`infra:stage_timeout`.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import ObjectRef
from ray.actor import ActorHandle
from ray.exceptions import RayError, RayTaskError

from prism_ray.bundle import load_bundle
from prism_ray.cluster.metrics import SchedulerMetrics
from prism_ray.cluster.stages import STAGES, Job, Outcome, stage_limit
from prism_ray.cluster.store_actor import Beat
from prism_ray.cluster.tasks import StageTasks
from prism_ray.config import Settings
from prism_ray.errors import BundleError, Reason
from prism_ray.report import RunReport

SCHEDULER_NAME = "prism-scheduler"
_CAPACITY_REFRESH_SECONDS = 5.0
log = logging.getLogger(__name__)


@dataclass
class Chain:
    """One claimed attempt moving through the stages."""

    job: Job
    bundle: ObjectRef
    stage: int = -1
    outcome: ObjectRef | None = None  # the running stage's Outcome
    payloads: dict[str, ObjectRef] = field(default_factory=dict)
    nodes: dict[str, str] = field(default_factory=dict)  # stage → the node it ran on
    started: float = 0.0  # monotonic, of the running stage
    deadline: float = float("inf")  # monotonic; a GPU stage's clock starts when its task does, not while it queues


class Scheduler:
    def __init__(self, store: ActorHandle, settings: Settings, has_head: bool) -> None:
        self.store = store
        self.settings = settings
        self.cluster = settings.cluster
        self.owner = f"scheduler-{uuid.uuid4().hex[:12]}"  # new per start: a stale attempt can never renew or score
        self.tasks = StageTasks(settings, has_head)
        self.metrics = SchedulerMetrics()
        self._settings_ref = ray.put(settings)
        self._chains: dict[str, Chain] = {}
        self._capacity = 0
        self._capacity_at = float("-inf")
        self._housekeeping_at = float("-inf")
        self._max_in_flight = 0
        self._claimed = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # --- control (actor methods) -----------------------------------------------------------------------------

    def start(self) -> list[str]:
        """Recover orphans of a previous scheduler, then run the loop; idempotent. Returns the requeued ids."""
        if self._thread is not None:
            return []
        recovered = ray.get(self.store.recover.remote([]))  # nothing is live yet: every running row is an orphan
        self._thread = threading.Thread(target=self._loop, name="prism-scheduler", daemon=True)
        self._thread.start()
        return recovered

    def stop(self) -> None:
        """Stop the loop and cancel the running stages; their rows stay `running` for the next start to recover."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        for chain in self._chains.values():
            ray.cancel(chain.outcome, force=True)
        self._chains.clear()

    def wake(self) -> None:
        """A submission arrived: claim now rather than at the next poll."""
        self._wake.set()

    def stats(self) -> dict[str, Any]:
        chains = dict(self._chains)
        return {"owner": self.owner, "capacity": self._capacity, "in_flight": len(chains),
                "max_in_flight": self._max_in_flight, "claimed": self._claimed,
                "stages": {sid: STAGES[chain.stage].name for sid, chain in chains.items() if chain.stage >= 0}}

    # --- the loop --------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # e.g. the store actor restarting: keep the chains, try again next turn
                log.exception("scheduler turn failed; retrying")
                self._stop.wait(self.cluster.poll_seconds)

    def tick(self) -> None:
        now = time.monotonic()
        if now - self._housekeeping_at >= self.cluster.heartbeat_seconds:
            self._housekeeping_at = now
            self._keep_alive()
            for submission_id in ray.get(self.store.requeue_expired.remote()):
                self._forget(submission_id, cancel=True)
                self.metrics.record_end("requeued", "infra:lease_expired")
        self._claim()
        self._harvest()
        self._enforce_limits()
        self.metrics.in_flight.set(len(self._chains))

    def capacity(self) -> int:
        if self.cluster.capacity:
            return self.cluster.capacity
        now = time.monotonic()
        if now - self._capacity_at >= _CAPACITY_REFRESH_SECONDS:  # follows nodes joining and leaving
            self._capacity = int(ray.cluster_resources().get("GPU", 0))
            self._capacity_at = now
        return self._capacity

    def _keep_alive(self) -> None:
        if not self._chains:
            return
        started = ray.get(self.store.keep_alive.remote([Beat(chain.job.submission_id, chain.job.owner,
                                                             chain.job.attempt) for chain in self._chains.values()]))
        offset = time.monotonic() - time.time()
        for submission_id, at in started.items():
            chain = self._chains.get(submission_id)
            if chain is not None and chain.deadline == float("inf"):
                chain.deadline = at + offset + stage_limit(STAGES[chain.stage], self.settings)

    def _claim(self) -> None:
        self._capacity = capacity = self.capacity()
        self.metrics.capacity.set(capacity)
        free = capacity - len(self._chains)
        if free <= 0:
            return
        for record, zipped in ray.get(self.store.claim.remote(self.owner, free)):
            self._claimed += 1
            job = Job(record.id, record.attempt, self.owner, time.time())
            try:  # the miner's zip as accepted at intake: parsing it runs no miner code
                bundle = load_bundle(zipped or b"", self.settings.intake)
            except BundleError as error:
                self._end(job, Outcome("rejected", error.reasons), "intake")
                continue
            if bundle.sha256 != record.bundle_sha256:  # the kept zip is not what intake accepted
                reason = Reason(rule="infra:bundle_mismatch", message=f"the stored zip holds files {bundle.sha256[:12]}"
                                f", not the {(record.bundle_sha256 or '')[:12]} accepted at intake")
                self._end(job, Outcome("failed", [reason]), "intake")
                continue
            chain = Chain(job, ray.put(bundle))
            self._chains[job.submission_id] = chain
            self._launch(chain, 0)
        self._max_in_flight = max(self._max_in_flight, len(self._chains))

    def _launch(self, chain: Chain, index: int) -> None:
        stage = STAGES[index]
        needs = [chain.payloads[name] for name in stage.needs]
        node = chain.nodes.get(stage.colocate) if stage.colocate else None
        chain.outcome, chain.payloads[stage.name] = self.tasks.launch(stage, chain.job, self.store,
                                                                      self._settings_ref, chain.bundle, needs, node)
        chain.stage = index
        chain.started = time.monotonic()
        chain.deadline = float("inf") if stage.gpu else chain.started + stage_limit(stage, self.settings)
        if not stage.gpu:  # a GPU task records its stage itself, with its node, once it runs
            job = chain.job
            self.store.set_stage.remote(job.submission_id, stage.name, owner=job.owner, attempt=job.attempt)

    def _harvest(self) -> None:
        if not self._chains:
            self._wake.wait(self.cluster.poll_seconds)
            self._wake.clear()
            return
        by_ref = {chain.outcome: chain for chain in self._chains.values()}
        refs = list(by_ref)
        ready, _ = ray.wait(refs, num_returns=1, timeout=self.cluster.poll_seconds)
        if ready:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ready:
            self._settle(by_ref[ref])

    def _settle(self, chain: Chain) -> None:
        stage = STAGES[chain.stage]
        self.metrics.stage_seconds.observe(time.monotonic() - chain.started, tags={"stage": stage.name})
        job = chain.job
        try:
            outcome: Outcome = ray.get(chain.outcome)
        except RayTaskError as error:
            self._forget(job.submission_id)
            if isinstance(error.cause, RayError):  # the task itself hit a system failure (e.g. the store restarting)
                self._requeue(job, error.cause)
            else:
                reason = Reason(rule="infra:stage_error", message=f"the {stage.name} stage raised: {error.cause!r}")
                self._end(job, Outcome("failed", [reason]), stage.name)
            return
        except RayError as error:
            self._forget(job.submission_id)
            self._requeue(job, error)
            return
        if outcome.node is not None:
            chain.nodes[stage.name] = outcome.node
        if outcome.audits:
            self.store.record_gate_audits.remote(job.submission_id, outcome.audits)
        if outcome.verdict == "next" and chain.stage + 1 < len(STAGES):
            self._launch(chain, chain.stage + 1)
            return
        self._forget(job.submission_id)
        if outcome.verdict == "next":
            outcome = Outcome("failed", [Reason(rule="infra:no_verdict", message="the last stage gave no verdict")])
        self._end(job, outcome, stage.name)

    def _enforce_limits(self) -> None:
        now = time.monotonic()
        for chain in [chain for chain in self._chains.values() if now > chain.deadline]:
            stage = STAGES[chain.stage]
            self._forget(chain.job.submission_id, cancel=True)
            rule = "run:timeout" if stage.gpu else "infra:stage_timeout"
            reason = Reason(rule=rule, message=f"the {stage.name} stage passed its wall-clock limit of "
                            f"{stage_limit(stage, self.settings):g} s and was stopped; it is not scored")
            self._end(chain.job, Outcome("failed", [reason]), stage.name)

    # --- endings ---------------------------------------------------------------------------------------------

    def _end(self, job: Job, outcome: Outcome, stage: str) -> None:
        guard = {"owner": job.owner, "attempt": job.attempt}
        if outcome.verdict == "completed" and outcome.report is not None:
            report = outcome.report
            written = ray.get(self.store.complete.remote(job.submission_id, report=report,
                                                         score=self._score_fields(report), curve=report.curve,
                                                         **guard))
            if written and report.bpb is not None:
                self.metrics.bpb.observe(report.bpb)
        elif outcome.verdict == "held":
            written = ray.get(self.store.hold.remote(job.submission_id, outcome.reasons, stage=stage, **guard))
        elif outcome.verdict in ("failed", "rejected"):
            written = ray.get(self.store.fail.remote(job.submission_id, outcome.reasons, stage=stage,
                                                     status=outcome.verdict, report=outcome.report, **guard))
        else:  # lost: the lease moved on (requeued or finished elsewhere), nothing of ours to write
            return
        if written:
            self.metrics.record_end(outcome.verdict, outcome.reasons[0].rule if outcome.reasons else None)

    def _requeue(self, job: Job, error: RayError) -> None:
        reason = Reason(rule=f"infra:{_snake(type(error).__name__)}",
                        message=f"a system failure ended this attempt, it is retried: {str(error)[:500]}")
        if ray.get(self.store.requeue.remote(job.submission_id, reason, owner=job.owner, attempt=job.attempt)):
            self.metrics.record_end("requeued", reason.rule)

    def _forget(self, submission_id: str, cancel: bool = False) -> None:
        chain = self._chains.pop(submission_id, None)
        if cancel and chain is not None:
            ray.cancel(chain.outcome, force=True)

    def _score_fields(self, report: RunReport) -> dict[str, Any]:
        """The scores row: the breakdown's terms and the held-out numbers once that stage reports them (the store adds
        the family and the epoch, both the submission's)."""
        breakdown, heldout = report.score or {}, report.heldout or {}
        return {"bpb": report.bpb, "final_score": report.final_score, "penalty": breakdown.get("penalty"),
                "anomaly": breakdown.get("anomaly"), "tie_break": breakdown.get("tie_break"),
                "heldout_delta": heldout.get("heldout_delta"), "gap": heldout.get("gap")}


def _snake(name: str) -> str:
    """NodeDiedError → node_died."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name.removesuffix("Error")).lower()


class _SchedulerActor(Scheduler):
    """The actor starts its own loop, so a Ray restart of the actor (max_restarts) resumes scheduling by itself."""

    def __init__(self, store: ActorHandle, settings: Settings, has_head: bool) -> None:
        super().__init__(store, settings, has_head)
        self.start()


def scheduler_actor(settings: Settings, store: ActorHandle, has_head: bool) -> ActorHandle:
    """The detached, named scheduler actor (created once; later callers get the running one)."""
    options: dict = {"name": SCHEDULER_NAME, "namespace": settings.cluster.namespace, "lifetime": "detached",
                     "get_if_exists": True, "num_cpus": 0, "max_restarts": -1}
    if has_head:  # next to the store: every turn talks to it
        options["resources"] = {"head": 0.001}
    return ray.remote(_SchedulerActor).options(**options).remote(store, settings, has_head)
