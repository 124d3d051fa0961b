"""Where each queued submission stands and roughly when it runs: positions and ETAs for the queue page and
`GET /v1/queue`.

The estimate is deliberately simple, so a miner can check it: a run takes about the median duration (claim to
finish) of the latest completed runs; the running submissions hold the slots (when work waits, the scheduler runs
as many at once as it can, so the number running is its capacity), each frees its slot when that duration has
passed since it was claimed, and the waiting ones take the slots in queue order as they free up.
"""

from __future__ import annotations

import heapq
import statistics
from dataclasses import dataclass
from typing import Any

from prism_ray.store import SubmissionRecord


@dataclass(frozen=True)
class QueueItem:
    record: SubmissionRecord
    position: int  # 1-based place in line: the running ones first (by arrival), then the waiting ones
    run: dict[str, Any]  # the running attempt's row in `runs` ({} while waiting)
    starts_in: float | None  # seconds from now; 0 once running; None while no run has completed to learn from
    done_in: float | None


def plan_queue(running: list[SubmissionRecord], pending: list[SubmissionRecord], runs: dict[str, dict[str, Any]],
               recent_seconds: list[float], now: float) -> tuple[list[QueueItem], float | None]:
    """(every item in line with its position and ETA, the typical run's seconds); `runs` maps a running id to its
    current run row, `recent_seconds` are durations of the latest completed runs."""
    typical = statistics.median(recent_seconds) if recent_seconds else None
    items = []
    free_at: list[float] = []  # seconds from now when each slot frees up
    for position, record in enumerate(running, start=1):
        run = runs.get(record.id, {})
        left = None if typical is None else max(0.0, typical - (now - run.get("started_at", now)))
        items.append(QueueItem(record, position, run, 0.0, left))
        free_at.append(left or 0.0)
    free_at = free_at or [0.0]  # nothing running: the scheduler claims the first one right away
    heapq.heapify(free_at)
    for position, record in enumerate(pending, start=len(running) + 1):
        if typical is None:
            items.append(QueueItem(record, position, {}, None, None))
            continue
        start = heapq.heappop(free_at)
        heapq.heappush(free_at, start + typical)
        items.append(QueueItem(record, position, {}, start, start + typical))
    return items, typical
