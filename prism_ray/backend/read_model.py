"""The read model: what the API and the pages read, kept in the reading process and refreshed when the store
changes, so a read is a dictionary lookup instead of a round trip to the process that owns the store.

Each read first makes sure the model is at most `max_staleness_s` old: it asks the store what changed since the
last look (`Store.changes_since`: the newest `updated_at` and the ids updated since), then drops
what those changes touch — that submission's detail and curve, the queue and the counts, and the leaderboard
when a submission completed. Everything else stays. Values are built on the first read after they were dropped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from prism_ray.backend.queue_eta import QueueItem, plan_queue
from prism_ray.config import Settings
from prism_ray.evaluation.scoring import CurvePoint, thin_curve
from prism_ray.ranking.leaderboard import (
    LeaderboardEntry,
    ScoreRow,
    SeedNoise,
    leaderboard,
    seed_noise,
    verdict_against_leader,
    weights,
)
from prism_ray.ranking.significance import Verdict
from prism_ray.store import SubmissionDetail
from prism_ray.store.port import StorePort

QUEUE_LIMIT = 500  # pending and running submissions the queue shows
RECENT_RUNS = 20  # completed runs whose durations estimate the queue's ETA
_MISSING = object()


@dataclass(frozen=True)
class QueueView:
    items: list[QueueItem]
    typical_run_seconds: float | None  # median of the latest completed runs; None until one completed


class ReadModel:
    def __init__(self, store: StorePort, settings: Settings, max_staleness_s: float = 0.1,
                 max_entries: int = 4096) -> None:
        self.store = store
        self.settings = settings
        self.max_staleness_s = max_staleness_s
        self.max_entries = max_entries
        self._cache: dict[tuple[Hashable, ...], Any] = {}
        self._lock = threading.Lock()
        self._generation = 0  # bumped whenever something is dropped: a build that overlapped a drop is not kept
        self._newest: float | None = None  # the store's newest updated_at at the last look
        self._looked_at = float("-inf")  # monotonic

    # --- reads --------------------------------------------------------------------------------------------------

    def detail(self, submission_id: str) -> SubmissionDetail | None:
        return self.cached(("detail", submission_id), lambda: self.store.detail(submission_id))

    def curve(self, submission_id: str) -> list[CurvePoint]:
        return self.cached(("curve", submission_id), lambda: thin_curve(self.store.curve(submission_id),
                                                                         self.settings.curve_points))

    def score_rows(self) -> list[ScoreRow]:
        return self.cached(("board", "rows"), self.store.scored_rows)

    def leaderboard(self, epoch: int | None) -> list[LeaderboardEntry]:
        return self.cached(("board", "entries", epoch),
                           lambda: leaderboard(self.score_rows(), epoch, self.settings.scoring))

    def weights(self, epoch: int | None) -> dict[str, float]:
        return self.cached(("board", "weights", epoch),
                           lambda: weights(self.score_rows(), self.settings.scoring, epoch))

    def seed_noise(self, epoch: int | None) -> SeedNoise:
        return self.cached(("board", "noise", epoch), lambda: seed_noise(self.score_rows(), epoch,
                                                                         self.settings.scoring))

    def verdict(self, submission_id: str, epoch: int | None) -> tuple[LeaderboardEntry, Verdict | None] | None:
        return self.cached(("board", "verdict", submission_id, epoch), lambda: verdict_against_leader(
            self.score_rows(), submission_id, epoch, self.settings.scoring))

    def stats(self) -> dict[str, Any]:
        return self.cached(("stats",), self.store.stats)

    def queue(self) -> QueueView:
        def build() -> QueueView:
            snapshot = self.store.queue_snapshot(QUEUE_LIMIT, RECENT_RUNS)
            items, typical = plan_queue(snapshot, time.time(), self.settings.byte_budget)
            return QueueView(items[:QUEUE_LIMIT], typical)

        return self.cached(("queue",), build)

    def cached(self, key: tuple[Hashable, ...], build: Callable[[], Any]) -> Any:
        """The value under `key`, built now if it was dropped since it was last built. The first element of the key
        says what drops it: "detail"/"curve" (with the submission id) when that submission changes, "queue" and
        "stats" on any change, "board" when a submission completes. Callers may cache their own renderings
        (a page, a JSON body) under these prefixes."""
        self.refresh()
        value = self._cache.get(key, _MISSING)
        if value is not _MISSING:
            return value
        generation = self._generation
        value = build()
        with self._lock:
            if self._generation == generation:
                self._cache[key] = value
                if len(self._cache) > self.max_entries:  # oldest first: a dict keeps insertion order
                    del self._cache[next(iter(self._cache))]
        return value

    # --- freshness ----------------------------------------------------------------------------------------------

    def refresh(self, force: bool = False) -> None:
        """Look at the store's changes if the last look is older than max_staleness_s (or `force`)."""
        if not force and time.monotonic() - self._looked_at < self.max_staleness_s:
            return
        with self._lock:
            if not force and time.monotonic() - self._looked_at < self.max_staleness_s:
                return  # another thread looked while this one waited
            newest, changed = self.store.changes_since(self._newest)
            self._looked_at = time.monotonic()
            if newest == self._newest:
                return
            first_look = self._newest is None
            self._newest = newest
            if first_look:
                self._cache.clear()
            else:
                self._drop(changed)
            self._generation += 1

    def invalidate(self) -> None:
        """The next read looks at the store first (this process just wrote to it)."""
        self._looked_at = float("-inf")

    def _drop(self, changed: list[tuple[str, str]]) -> None:
        ids = {submission_id for submission_id, _ in changed}
        parts = {"queue", "stats"} | ({"board"} if any(status == "completed" for _, status in changed) else set())
        self._cache = {key: value for key, value in self._cache.items()
                       if key[0] not in parts and not (key[0] in ("detail", "curve") and key[1] in ids)}
