"""The scheduler: claims queued submissions and audits from the store and runs each as a chain of stage tasks
(docs/architecture.md, "One submission's path").

The queues live in the store, so the scheduler holds nothing that a restart could lose: on start it requeues every
`running` row (those attempts died with a scheduler that crashed, their tasks with it); a scheduler that is stopped
drains instead, handing its running attempts back uncounted. A poll loop on a side thread
keeps at most `capacity` chains in flight; each turn it renews the leases of its CPU-stage attempts, requeues
expired leases, claims up to the free capacity (audits first: weights wait on them), harvests finished stages
(waking as soon as one finishes) and cuts stages that passed their wall-clock limit.

A seed replica (docs/scoring.md, "Seed replicas") is run the same way under its own seed, on any GPU node.

An audit re-runs a completed submission from its stored zip (the stages of `pipeline.RERUN_PLAN`) under the first
run's seed and byte budget, its GPU stages pinned to a node other than the one the first run trained on (when the
cluster has one). The store judges the re-run's report against the first run (prism_ray/ranking/audit.py).

Failures are sorted by who caused them: an operator-side fault (a full disk, an unwritable cache, a lost object, a
failed store write, a node declared dead: prism_ray/cluster/faults.py; a lapsed lease: its node hung or was cut off)
requeues the attempt without charging it, up to a cap, then holds the submission for the operator; another system
failure (a worker lost) requeues the attempt, explicitly and recorded, up to the store's attempt cap; an
application failure (a failed report, a rejection) is final and never retried; a stage over its limit is cancelled
and fails `run:timeout` (GPU stages) or `infra:stage_timeout`.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

import ray
from ray import ObjectRef
from ray.actor import ActorHandle
from ray.exceptions import RayError, RayTaskError

from prism_ray.cluster.chain import Chain, other_gpu_node
from prism_ray.cluster.faults import operator_fault, system_failure
from prism_ray.cluster.metrics import SchedulerMetrics
from prism_ray.cluster.store_actor import Beat
from prism_ray.cluster.tasks import StageTasks, run_slots
from prism_ray.config import Settings
from prism_ray.errors import BundleError, Reason
from prism_ray.evaluation.pipeline import ENDINGS, RERUN_PLAN, STAGES, Job, Outcome, stage_limit, stopped
from prism_ray.intake.bundle import load_bundle
from prism_ray.store import AUDIT_PREFIX, REPLICA_PREFIX, RerunRecord

SCHEDULER_NAME = "prism-scheduler"
_CAPACITY_REFRESH_SECONDS = 5.0
_DRAIN_SECONDS = 30.0  # how long stop() waits for cancelled stage tasks to end
log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, store: ActorHandle, settings: Settings, has_head: bool) -> None:
        self.store = store
        self.settings = settings
        self.cluster = settings.cluster
        self.owner = f"scheduler-{uuid.uuid4().hex[:12]}"  # new per start: a stale attempt can never renew or score
        self._leases = 0  # each claim's lease owner is `owner.<n>` (see _claim)
        self.tasks = StageTasks(settings, has_head)
        self.metrics = SchedulerMetrics()
        self._settings_ref = ray.put(settings)
        self._chains: dict[str, Chain] = {}
        self._capacity = 0
        self._capacity_at = float("-inf")
        self._housekeeping_at = float("-inf")
        self._max_in_flight = 0
        self._claimed = 0
        self._audits_claimed = 0
        self._replicas_claimed = 0
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

    def stop(self) -> list[str]:
        """Drain: stop claiming, hand every running attempt back to the queue uncounted (an operator's stop is not
        the miner's failure), cancel its stage and wait until the task is gone. Returns the ids handed back."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        chains, self._chains = list(self._chains.values()), {}
        # Handed back before the cancel: whatever a dying task still sends finds its lease gone.
        handed_back = ray.get([self.store.unclaim.remote(chain.job.submission_id, chain.job.owner, chain.job.attempt)
                               for chain in chains])
        for chain in chains:
            ray.cancel(chain.outcome, force=True)
        if chains:  # a force-cancelled task ends with its worker, and its sandboxed runner with that
            ray.wait([chain.outcome for chain in chains], num_returns=len(chains), timeout=_DRAIN_SECONDS)
        return [chain.job.submission_id for chain, done in zip(chains, handed_back, strict=True) if done]

    def wake(self) -> None:
        """A submission arrived: claim now rather than at the next poll."""
        self._wake.set()

    def stats(self) -> dict[str, Any]:
        chains = dict(self._chains)
        return {"owner": self.owner, "capacity": self._capacity, "in_flight": len(chains),
                "max_in_flight": self._max_in_flight, "claimed": self._claimed, "audits_claimed": self._audits_claimed,
                "replicas_claimed": self._replicas_claimed,
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
            for submission_id in ray.get(self.store.requeue_expired.remote(cap=self.cluster.max_infra_requeues)):
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
            per_run = self.settings.gpus_per_run  # a run's GPUs share one node: count whole runs per node
            self._capacity = int(ray.cluster_resources().get("GPU", 0)) if per_run == 1 else \
                run_slots(ray.nodes(), per_run)
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
        # A lease owner new per claim: an uncharged requeue gives the attempt's number back, so (owner, attempt)
        # alone tells the new claim from an abandoned one still running on a node that was cut off (its beats and
        # stage changes are refused, never mixed into the new attempt's).
        self._leases += 1
        owner = f"{self.owner}.{self._leases}"
        audits = ray.get(self.store.claim_audit_runs.remote(owner, free))
        for audit, zipped in audits:  # the audit's GPU stages avoid the node of the run it repeats
            self._audits_claimed += 1
            self._start_rerun(audit, zipped, owner, other_gpu_node(audit.original_node))
        free -= len(audits)
        # Replicas next: the board's top places wait on them, as weights wait on audits.
        replicas = ray.get(self.store.claim_replica_runs.remote(owner, free)) if free > 0 else []
        for replica, zipped in replicas:
            self._replicas_claimed += 1
            self._start_rerun(replica, zipped, owner, None)
        free -= len(replicas)
        if free > 0:
            for record, zipped in ray.get(self.store.claim.remote(owner, free)):
                self._claimed += 1
                job = Job(record.id, record.attempt, owner, time.time())
                bundle = self._unpack(job, zipped, record.bundle_sha256)
                if bundle is not None:
                    self._start(Chain(job, bundle, self._settings_ref, tuple(range(len(STAGES))), record.id))
        self._max_in_flight = max(self._max_in_flight, len(self._chains))

    def _start_rerun(self, item: RerunRecord, zipped: bytes | None, owner: str, target: str | None) -> None:
        """An audit or a seed replica: the re-run stages under its seed and byte budget (None: the settings')."""
        job = Job(item.id, item.attempt, owner, time.time())
        bundle = self._unpack(job, zipped, None)
        if bundle is None:
            return
        update = {name: value for name, value in (("seed", item.seed), ("byte_budget", item.byte_budget))
                  if value is not None}
        self._start(Chain(job, bundle, ray.put(self.settings.model_copy(update=update)), RERUN_PLAN,
                          item.submission_id, target=target))

    def _unpack(self, job: Job, zipped: bytes | None, expected_sha256: str | None) -> ObjectRef | None:
        """The miner's zip as accepted at intake, parsed (parsing runs no miner code); None when it ended the job."""
        try:
            bundle = load_bundle(zipped or b"", self.settings.intake)
        except BundleError as error:
            self._finish(job, Outcome("rejected", error.reasons), "intake")
            return None
        if expected_sha256 is not None and bundle.sha256 != expected_sha256:
            reason = Reason(rule="infra:bundle_mismatch", message=f"the stored zip holds files {bundle.sha256[:12]}, "
                            f"not the {expected_sha256[:12]} accepted at intake")
            self._finish(job, Outcome("failed", [reason]), "intake")
            return None
        return ray.put(bundle)

    def _start(self, chain: Chain) -> None:
        self._chains[chain.job.submission_id] = chain
        self._launch(chain, chain.plan[0])

    def _launch(self, chain: Chain, index: int) -> None:
        stage = STAGES[index]
        needs = [chain.payloads[name] for name in stage.needs]
        node = chain.nodes.get(stage.colocate) if stage.colocate else chain.target if stage.gpu else None
        chain.outcome, chain.payloads[stage.name] = self.tasks.launch(stage, chain.job, self.store, chain.settings,
                                                                      dict(chain.timings),
                                                                      chain.bundle, needs, node)
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
            if fault := operator_fault(error.cause):  # a full disk, an unwritable cache, a lost object: not the miner's
                self._requeue_uncharged(job, fault)
            elif isinstance(error.cause, RayError):  # the task itself hit a system failure (e.g. the store restarting)
                self._requeue(job, error.cause)
            else:
                reason = Reason(rule="infra:stage_error", message=f"the {stage.name} stage raised: {error.cause!r}")
                self._finish(job, Outcome("failed", [reason]), stage.name)
            return
        except RayError as error:
            self._forget(job.submission_id)
            if fault := operator_fault(error):
                self._requeue_uncharged(job, fault)
            else:
                self._requeue(job, error)
            return
        if outcome.node is not None:
            chain.nodes[stage.name] = outcome.node
        chain.timings[stage.name] = outcome.seconds
        if outcome.verdict == "retry":  # the stage says a system failure ended it (e.g. a runner killed from outside)
            self._forget(job.submission_id)
            self._requeue_reason(job, outcome.reasons[0])
            return
        if outcome.audits:
            self.store.record_gate_audits.remote(chain.submission_id, outcome.audits)
        if outcome.note is not None:
            self.store.note.remote(job.submission_id, stage.name, outcome.note, job.owner, job.attempt)
        later = [index for index in chain.plan if index > chain.stage]
        if outcome.verdict == "next" and later:
            self._launch(chain, later[0])
            return
        self._forget(job.submission_id)
        if outcome.verdict == "next":
            outcome = Outcome("failed", [Reason(rule="infra:no_verdict", message="the last stage gave no verdict")])
        self._finish(job, outcome, stage.name)

    def _enforce_limits(self) -> None:
        now = time.monotonic()
        for chain in [chain for chain in self._chains.values() if now > chain.deadline]:
            stage = STAGES[chain.stage]
            self._forget(chain.job.submission_id, cancel=True)
            rule = "run:timeout" if stage.gpu else "infra:stage_timeout"
            reason = Reason(rule=rule, message=f"the {stage.name} stage passed its wall-clock limit of "
                            f"{stage_limit(stage, self.settings):g} s and was stopped; it is not scored")
            self._finish(chain.job, Outcome("failed", [reason]), stage.name)

    # --- endings ---------------------------------------------------------------------------------------------

    def _finish(self, job: Job, outcome: Outcome, stage: str) -> None:
        """Every ending is stored with its report: a stage that ends the submission brings one (pipeline.run_stage);
        an ending the scheduler decides (the zip did not load, a stage passed its limit or raised) gets one here."""
        reached_end = outcome.report is not None and stage == STAGES[-1].name  # a re-run with a verdict to judge
        if outcome.verdict in ENDINGS and outcome.report is None:
            outcome.report = stopped(None, stage, outcome, {}, None)
        if job.submission_id.startswith((AUDIT_PREFIX, REPLICA_PREFIX)):
            self._end_rerun(job, outcome, stage, reached_end)
        else:
            self._end(job, outcome, stage)

    def _end_rerun(self, job: Job, outcome: Outcome, stage: str, reached_end: bool) -> None:
        """A re-run that reached its end goes to the store to be judged (an audit) or kept (a replica); one that
        ended earlier fails, with its report."""
        if outcome.verdict == "lost":
            return
        audit = job.submission_id.startswith(AUDIT_PREFIX)
        if reached_end:
            finish = self.store.finish_audit if audit else self.store.finish_replica
            record = ray.get(finish.remote(job.submission_id, job.owner, outcome.report, attempt=job.attempt))
            ended = record.status if record is not None else None
        else:
            fail = self.store.fail_audit if audit else self.store.fail_replica
            ended = "failed" if ray.get(fail.remote(job.submission_id, outcome.reasons, stage, owner=job.owner,
                                                    attempt=job.attempt, report=outcome.report)) else None
        if ended is not None:
            (self.metrics.audits if audit else self.metrics.replicas).inc(tags={"status": ended})

    def _end(self, job: Job, outcome: Outcome, stage: str) -> None:
        try:
            self._write_end(job, outcome, stage)
        except RayError as error:  # the store failed to write the result: the operator's fault, never the miner's
            fault = operator_fault(error)
            if fault is None:
                raise
            self._requeue_uncharged(job, fault)

    def _write_end(self, job: Job, outcome: Outcome, stage: str) -> None:
        guard = {"owner": job.owner, "attempt": job.attempt}
        if outcome.verdict == "completed" and outcome.report is not None:
            report = outcome.report
            written = ray.get(self.store.complete.remote(job.submission_id, report=report, **guard))
            if written and report.bpb is not None:
                self.metrics.bpb.observe(report.bpb)
        elif outcome.verdict == "held":
            written = ray.get(self.store.hold.remote(job.submission_id, outcome.reasons, stage=stage,
                                                     report=outcome.report, **guard))
        elif outcome.verdict in ("failed", "rejected"):
            written = ray.get(self.store.fail.remote(job.submission_id, outcome.reasons, stage=stage,
                                                     status=outcome.verdict, report=outcome.report, **guard))
        else:  # lost: the lease moved on (requeued or finished elsewhere), nothing of ours to write
            return
        if written:
            self.metrics.record_end(outcome.verdict, outcome.reasons[0].rule if outcome.reasons else None)

    def _requeue(self, job: Job, error: RayError) -> None:
        self._requeue_reason(job, system_failure(error))

    def _requeue_uncharged(self, job: Job, reason: Reason) -> None:
        status = ray.get(self.store.requeue_uncharged.remote(job.submission_id, reason, job.owner, job.attempt,
                                                             self.cluster.max_infra_requeues))
        if status is not None and not job.submission_id.startswith((AUDIT_PREFIX, REPLICA_PREFIX)):
            self.metrics.record_end("requeued" if status != "held" else "held", reason.rule)

    def _requeue_reason(self, job: Job, reason: Reason) -> None:
        if ray.get(self.store.requeue.remote(job.submission_id, reason, owner=job.owner, attempt=job.attempt)):
            if job.submission_id.startswith(AUDIT_PREFIX):
                self.metrics.audits.inc(tags={"status": "requeued"})
            elif job.submission_id.startswith(REPLICA_PREFIX):
                self.metrics.replicas.inc(tags={"status": "requeued"})
            else:
                self.metrics.record_end("requeued", reason.rule)

    def _forget(self, submission_id: str, cancel: bool = False) -> None:
        chain = self._chains.pop(submission_id, None)
        if cancel and chain is not None:
            ray.cancel(chain.outcome, force=True)


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
