"""The durable queue's state machine, shared by submissions and audits: claim with a lease, renew it with progress,
record the stage, end or requeue an attempt. Every transition of a running item is guarded by its lease (owner,
attempt), so a stale attempt can never end it twice; each attempt has a `runs` row and each transition an event,
both keyed by the item's id (docs/store.md, "How a submission moves")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prism_ray.errors import Reason
from prism_ray.evaluation.report import RunReport
from prism_ray.store.db import Db, dump, finite, to_json

LEASE_EXPIRED = Reason(rule="infra:lease_expired", message="the node running this attempt stopped reporting (hung, "
                       "lost or cut off from the head) and its lease expired")


@dataclass(frozen=True)
class Change:
    """One transition of a queue item: its row, its open run row (closed with the outcome) and one event."""

    id: str
    attempt: int
    status: str
    stage: str
    reasons: list[Reason]
    kind: str
    detail: dict[str, Any]
    report: RunReport | None = None


class Queue:
    """The lease-guarded queue over one table (`submissions` or `audits`), which both have the queue columns: id,
    seq, status, stage, reasons, attempt, max_attempts, lease_owner, lease_expires_at, updated_at, finished_at."""

    def __init__(self, db: Db, table: str, terminal: Sequence[str]) -> None:
        self.db = db
        self.table = table
        self.terminal = list(terminal)

    def claim(self, owner: str, lease_seconds: float, limit: int) -> list[str]:
        """Oldest pending first → running with attempt+1 and a lease held by `owner`; one new run row each.
        A requeued item keeps its place in line (its `seq`), so a retry is not pushed behind newer work."""
        now = self.db.clock()
        with self.db.transaction() as con:
            claimed = con.execute(
                f"UPDATE {self.table} SET status = 'running', stage = 'claimed', reasons = '[]', "
                "attempt = attempt + 1, lease_owner = ?, lease_expires_at = ?, updated_at = ? "
                f"WHERE id IN (SELECT id FROM {self.table} WHERE status = 'pending' ORDER BY seq LIMIT ?) "
                "RETURNING id, attempt",
                [owner, now + lease_seconds, now, limit]).fetchall()
            if not claimed:
                return []
            ids, attempts = [row[0] for row in claimed], [row[1] for row in claimed]
            con.execute(
                "INSERT INTO runs (id, submission_id, attempt, started_at, status, stage, reasons) "
                "SELECT 'run_' || replace(uuid()::VARCHAR, '-', ''), unnest(?::VARCHAR[]), unnest(?::INTEGER[]), ?, "
                "'running', 'claimed', '[]'", [ids, attempts, now])
            self.db.append_events([(item, "claimed", "claimed", {"owner": owner, "attempt": attempt,
                                                                 "lease_expires_at": now + lease_seconds})
                                   for item, attempt in claimed], now)
        ordered = self.db.execute(f"SELECT id FROM {self.table} WHERE list_contains(?::VARCHAR[], id) ORDER BY seq",
                                  [ids]).fetchall()
        return [row[0] for row in ordered]

    def renew(self, item_id: str, owner: str, lease_seconds: float, progress_bytes: int | None = None,
              progress_bpb: float | None = None, tokens_per_second: float | None = None,
              attempt: int | None = None) -> bool:
        """Extend the lease and record progress; False when the lease was lost (requeued or finished)."""
        now = self.db.clock()
        with self.db.transaction() as con:
            renewed = con.execute(
                f"UPDATE {self.table} SET lease_expires_at = ?, updated_at = ? WHERE id = ? AND status = 'running' "
                "AND lease_owner = ? AND (?::INTEGER IS NULL OR attempt = ?) RETURNING attempt",
                [now + lease_seconds, now, item_id, owner, attempt, attempt]).fetchone()
            if renewed is None:
                return False
            con.execute(
                "UPDATE runs SET progress_bytes = coalesce(?, progress_bytes), "
                "progress_bpb = coalesce(?, progress_bpb), tokens_per_second = coalesce(?, tokens_per_second), "
                "progress_at = ? WHERE submission_id = ? AND attempt = ?",
                [progress_bytes, finite(progress_bpb), finite(tokens_per_second), now, item_id, renewed[0]])
            if self.table == "submissions" and progress_bytes and finite(progress_bpb) is not None:
                # A live point: a page opened mid-run draws the curve so far (replaced by the run's own at the end).
                con.execute("INSERT INTO curves VALUES (?, ?, ?, ?)", [item_id, renewed[0], progress_bytes,
                                                                        progress_bpb])
            return True

    def note(self, item_id: str, stage: str, detail: dict[str, Any], owner: str, attempt: int) -> bool:
        """A `decided` event on the timeline (what a stage decided, e.g. the gate skipped), under the lease."""
        with self.db.transaction():
            if not self.guarded([item_id], ("running",), owner, attempt):
                return False
            self.db.append_events([(item_id, "decided", stage, detail)], self.db.clock())
            return True

    def _drop_live_curve(self, pairs: list[tuple[str, int]]) -> None:
        """The live points of attempts that will never complete (requeued, handed back)."""
        if self.table == "submissions" and pairs:
            self.db.execute("DELETE FROM curves WHERE (submission_id, attempt) IN (SELECT unnest(?::VARCHAR[]), "
                            "unnest(?::INTEGER[]))", [[item for item, _ in pairs], [attempt for _, attempt in pairs]])

    def set_stage(self, item_id: str, stage: str, node: str | None = None, owner: str | None = None,
                  attempt: int | None = None) -> bool:
        """Record the stage a running item entered (and the node it runs on, once known)."""
        now = self.db.clock()
        with self.db.transaction() as con:
            updated = con.execute(
                f"UPDATE {self.table} SET stage = ?, updated_at = ? WHERE id = ? AND status = 'running' "
                "AND (?::VARCHAR IS NULL OR lease_owner = ?) AND (?::INTEGER IS NULL OR attempt = ?) RETURNING attempt",
                [stage, now, item_id, owner, owner, attempt, attempt]).fetchone()
            if updated is None:
                return False
            con.execute("UPDATE runs SET stage = ?, node = coalesce(?, node) WHERE submission_id = ? AND attempt = ?",
                        [stage, node, item_id, updated[0]])
            self.db.append_events([(item_id, "stage", stage, {"node": node} if node else {})], now)
            return True

    def guarded(self, ids: Sequence[str], statuses: Sequence[str], owner: str | None,
                attempt: int | None) -> list[dict[str, Any]]:
        """Those items that are in one of `statuses` and, when given, still leased to owner/attempt."""
        return self.db.rows(
            f"SELECT * FROM {self.table} WHERE list_contains(?::VARCHAR[], id) AND list_contains(?::VARCHAR[], status) "
            "AND (?::VARCHAR IS NULL OR lease_owner = ?) AND (?::INTEGER IS NULL OR attempt = ?) ORDER BY seq",
            [list(ids), list(statuses), owner, owner, attempt, attempt])

    def apply(self, changes: list[Change]) -> None:
        """Write transitions in three statements: the items, their open run rows, the events."""
        if not changes:
            return
        now = self.db.clock()
        ids = [change.id for change in changes]
        statuses = [change.status for change in changes]
        reasons = [to_json(dump(change.reasons)) for change in changes]
        with self.db.transaction() as con:
            con.execute(
                f"UPDATE {self.table} AS s SET status = u.status, stage = u.stage, reasons = u.reasons::JSON, "
                "updated_at = ?, lease_owner = NULL, lease_expires_at = NULL, "
                "finished_at = CASE WHEN list_contains(?::VARCHAR[], u.status) THEN ? END "
                "FROM (SELECT unnest(?::VARCHAR[]) AS id, unnest(?::VARCHAR[]) AS status, "
                "unnest(?::VARCHAR[]) AS stage, unnest(?::VARCHAR[]) AS reasons) AS u WHERE s.id = u.id",
                [now, self.terminal, now, ids, statuses, [change.stage for change in changes], reasons])
            # The attempt's run row closes with the outcome; a requeued attempt ends `requeued`.
            con.execute(
                "UPDATE runs AS r SET status = u.status, stage = u.stage, reasons = u.reasons::JSON, "
                "report = u.report::JSON, finished_at = ? "
                "FROM (SELECT unnest(?::VARCHAR[]) AS id, unnest(?::INTEGER[]) AS attempt, "
                "unnest(?::VARCHAR[]) AS status, unnest(?::VARCHAR[]) AS stage, unnest(?::VARCHAR[]) AS reasons, "
                "unnest(?::VARCHAR[]) AS report) AS u "
                "WHERE r.submission_id = u.id AND r.attempt = u.attempt AND r.finished_at IS NULL",
                [now, ids, [change.attempt for change in changes],
                 ["requeued" if status == "pending" else status for status in statuses],
                 [change.stage for change in changes], reasons,
                 [None if change.report is None else to_json(change.report.model_dump(mode="json"))
                 for change in changes]])
            self.db.append_events([(change.id, change.kind, change.stage, change.detail) for change in changes], now)
            self._drop_live_curve([(change.id, change.attempt) for change in changes if change.status == "pending"])

    def unclaim(self, item_id: str, owner: str, attempt: int) -> bool:
        """A draining scheduler hands a running attempt back (an operator stopped the cluster: nobody's failure):
        pending again with the claim undone, so the restart costs no attempt. The attempt's run row goes, so its
        number can be claimed again; what it had reached stays in the `unclaimed` event. False unless `owner`
        still holds that attempt's lease."""
        now = self.db.clock()
        with self.db.transaction() as con:
            if not self.guarded([item_id], ("running",), owner, attempt):
                return False
            interrupted = self.db.rows("DELETE FROM runs WHERE submission_id = ? AND attempt = ? RETURNING stage, "
                                       "node, progress_bytes, progress_bpb", [item_id, attempt])
            self._drop_live_curve([(item_id, attempt)])
            con.execute(f"UPDATE {self.table} SET status = 'pending', stage = 'queued', reasons = '[]', "
                        "attempt = attempt - 1, lease_owner = NULL, lease_expires_at = NULL, updated_at = ? "
                        "WHERE id = ?", [now, item_id])
            self.db.append_events([(item_id, "unclaimed", "queued",
                                    {"owner": owner, "attempt": attempt, "not_counted": True,
                                     "interrupted": interrupted[0] if interrupted else None})], now)
            return True

    def requeue(self, ids: Sequence[str], reasons: list[Reason], owner: str | None = None,
                attempt: int | None = None) -> list[str]:
        """A system failure (not the miner's): back to pending, or `failed` once the attempts are spent."""
        changes: list[Change] = []
        with self.db.transaction():
            for row in self.guarded(ids, ("running",), owner, attempt):
                if row["attempt"] >= row["max_attempts"]:
                    exhausted = Reason(rule="infra:attempts_exhausted", message=f"gave up after {row['attempt']} "
                                       f"attempts; the last one ended: {reasons[0].message}")
                    final = [exhausted, *reasons]
                    changes.append(Change(row["id"], row["attempt"], "failed", row["stage"], final, "failed",
                                          {"attempt": row["attempt"], "reasons": dump(final)}))
                else:
                    changes.append(Change(row["id"], row["attempt"], "pending", "queued", reasons, "requeued",
                                          {"attempt": row["attempt"], "reasons": dump(reasons)}))
            self.apply(changes)
        return [change.id for change in changes]

    def requeue_expired(self, now: float, uncharged_cap: int | None = None, held: str | None = None) -> list[str]:
        """Running items whose lease expired. With `uncharged_cap` (submissions: a lapsed lease means prism-ray's own
        heartbeat stopped, i.e. its node hung or became unreachable, never the miner's doing) each goes through
        `requeue_uncharged`; without it (audits, seed replicas) through the charged `requeue`."""
        expired = self.db.execute(f"SELECT id, lease_owner, attempt FROM {self.table} WHERE status = 'running' "
                                  "AND lease_expires_at < ? ORDER BY seq", [now]).fetchall()
        if uncharged_cap is None:
            return self.requeue([row[0] for row in expired], [LEASE_EXPIRED])
        reason = LEASE_EXPIRED.model_copy(update={"message": f"{LEASE_EXPIRED.message}; this attempt is not charged "
                                                  "to the miner"})
        return [item for item, owner, attempt in expired
                if self.requeue_uncharged(item, reason, owner, attempt, uncharged_cap, held) is not None]

    def recover(self, live_ids: Sequence[str]) -> list[str]:
        """Running items the scheduler does not know are orphans of a dead scheduler → requeued."""
        orphans = self.db.execute(f"SELECT id FROM {self.table} WHERE status = 'running' AND "
                                  "NOT list_contains(?::VARCHAR[], id) ORDER BY seq", [list(live_ids)]).fetchall()
        reason = Reason(rule="infra:orphaned", message="the scheduler restarted while this run was in flight")
        return self.requeue([row[0] for row in orphans], [reason])

    def requeue_uncharged(self, item_id: str, reason: Reason, owner: str, attempt: int, cap: int,
                          held: str | None) -> str | None:
        """An operator-side fault ended the attempt (a full disk, an unwritable cache, a lost object, a failed store
        write: docs/operator.md, "Operator faults"): pending again with the claim undone, so it costs no attempt —
        the first `cap` times. Past the cap the item goes to `held` (when this queue has that status; `held` names
        it) for an operator, uncharged too; without it, to the charged `requeue`. Returns the new status, or None
        unless `owner` still holds that attempt's lease."""
        now = self.db.clock()
        with self.db.transaction() as con:
            rows = self.guarded([item_id], ("running",), owner, attempt)
            if not rows:
                return None
            faults = con.execute("SELECT count(*) FROM events WHERE submission_id = ? AND kind = 'infra_requeued'",
                                 [item_id]).fetchone()[0]
            if faults >= cap and held is None:
                self.requeue([item_id], [reason], owner, attempt)
                return "charged"
            interrupted = self.db.rows("DELETE FROM runs WHERE submission_id = ? AND attempt = ? RETURNING stage, "
                                       "node, progress_bytes, progress_bpb", [item_id, attempt])
            self._drop_live_curve([(item_id, attempt)])
            if faults < cap:
                status, stage, kind, reasons = "pending", "queued", "infra_requeued", [reason]
            else:
                status, stage, kind = held, rows[0]["stage"], "held"
                reasons = [Reason(rule="infra:held_for_operator", message=f"{faults + 1} operator-side faults ended "
                                  "this submission's attempts without charging them; it waits for the operator to "
                                  f"fix the cause and release it. The last one: {reason.message}"), reason]
            con.execute(f"UPDATE {self.table} SET status = ?, stage = ?, reasons = ?::JSON, attempt = attempt - 1, "
                        "lease_owner = NULL, lease_expires_at = NULL, updated_at = ? WHERE id = ?",
                        [status, stage, to_json(dump(reasons)), now, item_id])
            self.db.append_events([(item_id, kind, stage, {"owner": owner, "attempt": attempt, "not_counted": True,
                                                           "reasons": dump(reasons),
                                                           "interrupted": interrupted[0] if interrupted else None})],
                                  now)
            return status
