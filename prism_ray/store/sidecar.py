"""The small tables beside the queue: auth nonces (replay protection), the gate's verdict cache and the record of
every call to the gate's model."""

from __future__ import annotations

from collections.abc import Sequence

from prism_ray.gate.hard_gate import CachedVerdict, GateAudit
from prism_ray.store.db import Db, to_json

_GATE_REVIEW_COLUMNS = (("request_sha256", "VARCHAR"), ("model", "VARCHAR"), ("prompt_version", "VARCHAR"),
                        ("outcome", "VARCHAR"), ("raw_reply", "VARCHAR"), ("latency_s", "DOUBLE"),
                        ("prompt_tokens", "INTEGER"), ("completion_tokens", "INTEGER"), ("attempt", "INTEGER"),
                        ("error", "VARCHAR"))


class Sidecar:
    def __init__(self, db: Db) -> None:
        self.db = db

    def check_nonces(self, checks: Sequence[tuple[str, str, float]]) -> list[bool]:
        """Per (hotkey, nonce, ttl): True, and remembered, unless that nonce was seen within `ttl` seconds."""
        if not checks:
            return []
        now = self.db.clock()
        with self.db.transaction() as con:
            con.execute("DELETE FROM nonces WHERE seen_at < ?", [now - max(ttl for _, _, ttl in checks)])
            seen = dict(((hotkey, nonce), seen_at) for hotkey, nonce, seen_at in con.execute(
                "SELECT n.hotkey, n.nonce, n.seen_at FROM nonces n JOIN (SELECT unnest(?::VARCHAR[]) AS hotkey, "
                "unnest(?::VARCHAR[]) AS nonce) b ON n.hotkey = b.hotkey AND n.nonce = b.nonce",
                [[hotkey for hotkey, _, _ in checks], [nonce for _, nonce, _ in checks]]).fetchall())
            fresh = []
            for hotkey, nonce, ttl in checks:
                fresh.append(seen.get((hotkey, nonce), float("-inf")) < now - ttl)
                if fresh[-1]:
                    seen[(hotkey, nonce)] = now
            new = [(hotkey, nonce) for (hotkey, nonce, _), ok in zip(checks, fresh, strict=True) if ok]
            if new:
                con.execute("INSERT INTO nonces (hotkey, nonce, seen_at) SELECT unnest(?::VARCHAR[]), "
                            "unnest(?::VARCHAR[]), ? ON CONFLICT DO UPDATE SET seen_at = excluded.seen_at",
                            [[hotkey for hotkey, _ in new], [nonce for _, nonce in new], now])
            return fresh

    def verdict(self, key: str) -> CachedVerdict | None:
        row = self.db.execute("SELECT verdict FROM gate_verdicts WHERE cache_key = ?", [key]).fetchone()
        return CachedVerdict.model_validate_json(row[0]) if row else None

    def keep_verdict(self, key: str, verdict: CachedVerdict) -> None:
        with self.db.transaction() as con:
            con.execute("INSERT OR REPLACE INTO gate_verdicts VALUES (?, ?::JSON, ?)",
                        [key, to_json(verdict.model_dump(mode="json")), self.db.clock()])

    def record_gate_reviews(self, submission_id: str | None, reviews: Sequence[GateAudit]) -> None:
        if not reviews:
            return
        rows = [review.model_dump(mode="json") for review in reviews]
        names = [name for name, _ in _GATE_REVIEW_COLUMNS]
        selects = ", ".join(f"unnest(?::{kind}[]) AS {name}" for name, kind in _GATE_REVIEW_COLUMNS)
        with self.db.transaction() as con:
            con.execute(f"INSERT INTO gate_reviews (submission_id, created_at, {', '.join(names)}) "
                        f"SELECT ?, ?, {selects}", [submission_id, self.db.clock(),
                                                    *([row.get(name) for row in rows] for name in names)])
