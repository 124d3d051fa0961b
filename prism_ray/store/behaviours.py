"""Copies by behaviour in the store (docs/scoring.md, "Copies"): each completed run's signature (prism_ray/
behaviour.py), indexed by its conditions and its exact head, and the copy links it implies. A run's original is the
earliest submission among the runs that agree with it (itself included); it is a copy when that original is another
hotkey's. Written in the transaction that stores the score, from the report the trusted side assembled. A new run
can only become the original of runs that agree with it, so the links depend on which runs completed, never on the
order they completed in: a restart, or an earlier submission completing last, ends the same way."""

from __future__ import annotations

from typing import Any

from prism_ray.config import AuditSettings
from prism_ray.errors import Reason
from prism_ray.evaluation.report import RunReport
from prism_ray.ranking.audit import tolerance
from prism_ray.ranking.behaviour import Signature, same_learner, signature
from prism_ray.store.db import Db, dump, to_json

_COPY_RULE = "copy:duplicate"

# The completed runs under the same conditions that may agree with a new head: the bit-identical ones by the exact
# hash, and, where a tolerance applies (a CUDA run on either side), those whose sums are close enough to allow it.
_CANDIDATES = """
SELECT b.submission_id AS id, b.head, b.head_sha256, b.device, b.copy_of AS linked, s.hotkey, s.seq, s.copy_of,
       s.notes, o.id AS original, o.seq AS original_seq, o.hotkey AS original_hotkey
FROM behaviours b JOIN submissions s ON s.id = b.submission_id JOIN submissions o ON o.id = b.original
WHERE b.key = ? AND s.status = 'completed' AND (b.head_sha256 = ? OR abs(b.head_sum - ?) <=
      (CASE WHEN ? OR starts_with(b.device, 'cuda') THEN ? ELSE ? END) * (b.head_sum + ?))
"""


class Behaviours:
    def __init__(self, db: Db, audit: AuditSettings) -> None:
        self.db = db
        self.audit = audit

    def link(self, submission_id: str, report: RunReport) -> None:
        """Keep a completed run's signature; link it to its original, and become the original of the runs that
        agree with it and were submitted after it. Runs linked as copies at intake (by their code) keep that link."""
        mine = signature(report)
        if mine is None:
            return
        now = self.db.clock()
        self.db.execute("INSERT INTO behaviours VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?)",
                        [submission_id, mine.key, mine.head_sha256, mine.head, sum(mine.head), mine.device,
                         submission_id, now])
        rows = self.db.rows(_CANDIDATES, self._candidate_params(mine))
        me = next(row for row in rows if row["id"] == submission_id)
        agreeing = [row for row in rows if row["id"] != submission_id and self._agrees(mine, row)]
        first = min([me, *agreeing], key=lambda row: row["seq"])
        events = [self._relink(me, first, len(mine.head), now)]
        events += [self._relink(row, me, len(mine.head), now) for row in agreeing if me["seq"] < row["original_seq"]]
        self.db.append_events([event for event in events if event], now)

    def _relink(self, row: dict[str, Any], original: dict[str, Any], batches: int,
                now: float) -> tuple[str, str, str, dict[str, Any]] | None:
        """Make `original` the run's original; update its copy link (and note) if that changes it. The event of the
        change, if any."""
        if row["original"] != original["id"]:
            self.db.execute("UPDATE behaviours SET original = ? WHERE submission_id = ?", [original["id"], row["id"]])
        wanted = original["id"] if original["hotkey"] != row["hotkey"] else None
        if row["linked"] == wanted or (row["linked"] is None and row["copy_of"] is not None):
            return None
        notes = [note for note in row["notes"] if not (row["linked"] and note["rule"] == _COPY_RULE)]
        added = [_note(original["id"], batches)] if wanted else []
        self.db.execute("UPDATE submissions SET copy_of = ?, notes = ?::JSON, updated_at = ? WHERE id = ?",
                        [wanted, to_json([*notes, *dump(added)]), now, row["id"]])
        self.db.execute("UPDATE behaviours SET copy_of = ? WHERE submission_id = ?", [wanted, row["id"]])
        return row["id"], "copy", "score", {"copy_of": wanted, "by": "behaviour", "reasons": dump(added)}

    def _candidate_params(self, mine: Signature) -> list[Any]:
        total = sum(mine.head)
        return [mine.key, mine.head_sha256, total, _cuda(mine.device), self.audit.cuda_rtol, self.audit.cpu_rtol,
                total]

    def _agrees(self, mine: Signature, row: dict[str, Any]) -> bool:
        if row["head_sha256"] == mine.head_sha256:
            return True
        return same_learner(mine.head, list(row["head"]), tolerance([mine.device, row["device"]], self.audit))


def _cuda(device: str) -> bool:
    return device.startswith("cuda")


def _note(original: str, batches: int) -> Reason:
    return Reason(rule=_COPY_RULE, message=(
        f"the same learner as the earlier submission {original} of another hotkey: its first {batches} per-batch "
        "losses on the same data, seed and batch geometry agree (bit for bit on the CPU, within the audit tolerance "
        "on CUDA), whatever the code looks like; it is evaluated and shown, but earns no weight: the earliest "
        "submission keeps it"))
