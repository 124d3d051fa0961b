"""Where each queued submission stands and roughly when it runs: positions and ETAs for the queue page and
`GET /v1/queue`.

The estimate is deliberately simple, so a miner can check it: a running submission that has reported progress
finishes when the rest of its byte budget is scored at its own rate so far (bytes scored since it was claimed);
one that has not, and every waiting one, takes about the median duration (claim to finish) of the latest completed
runs. The running submissions hold the slots (when work waits, the scheduler runs as many at once as it can, so the
number running is its capacity), each frees its slot when it finishes, and the waiting ones take the slots in queue
order as they free up.
"""

from __future__ import annotations

import heapq
import statistics
from dataclasses import dataclass

from prism_ray.store import QueueSnapshot, RunRecord, SubmissionRecord


@dataclass(frozen=True)
class QueueItem:
    record: SubmissionRecord
    position: int  # 1-based place in line: the running ones first (by arrival), then the waiting ones
    run: RunRecord | None  # the running attempt (None while waiting)
    starts_in: float | None  # seconds from now; 0 once running; None while no run has completed to learn from
    done_in: float | None


def plan_queue(snapshot: QueueSnapshot, now: float,
               byte_budget: int | None = None) -> tuple[list[QueueItem], float | None]:
    """(every item in line with its position and ETA, the typical run's seconds); `byte_budget` is the bytes each run
    scores (0 or None: unknown, the whole split)."""
    recent_seconds, running, pending = snapshot.recent_run_seconds, snapshot.running, snapshot.pending
    typical = statistics.median(recent_seconds) if recent_seconds else None
    items = []
    free_at: list[float] = []  # seconds from now when each slot frees up
    for position, record in enumerate(running, start=1):
        run = snapshot.current_runs.get(record.id)
        left = _time_left(run, typical, now, byte_budget)
        items.append(QueueItem(record, position, run, 0.0, left))
        free_at.append(left or 0.0)
    free_at = free_at or [0.0]  # nothing running: the scheduler claims the first one right away
    heapq.heapify(free_at)
    for position, record in enumerate(pending, start=len(running) + 1):
        if typical is None:
            items.append(QueueItem(record, position, None, None, None))
            continue
        start = heapq.heappop(free_at)
        heapq.heappush(free_at, start + typical)
        items.append(QueueItem(record, position, None, start, start + typical))
    return items, typical


def _time_left(run: RunRecord | None, typical: float | None, now: float, byte_budget: int | None) -> float | None:
    """The rest of its budget at its own rate once it has scored bytes; else the typical run, from its claim."""
    done, at, started = (run.progress_bytes, run.progress_at, run.started_at) if run else (None, None, None)
    if byte_budget and done and at and started and at > started:
        rate = done / (at - started)
        return max(0.0, (byte_budget - done) / rate - (now - at))
    return None if typical is None else max(0.0, typical - (now - (started or now)))
