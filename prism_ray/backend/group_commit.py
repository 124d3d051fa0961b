"""Group commit: many threads' single-item calls answered by few calls on lists.

The store has one owner and every write is a transaction, so a hundred concurrent intakes written one by one wait
behind each other (~20 ms each on DuckDB). Here the first caller runs its item at once; the callers that arrive while
that call is in flight queue up and go together in the next call, so a burst of N costs a few store round trips and
each caller waits for at most the call in flight plus its own batch's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Slot(Generic[Item, Result]):
    item: Item
    done: bool = False
    result: Result | None = None
    error: BaseException | None = None


class GroupCommit(Generic[Item, Result]):
    """`commit(item)` returns `run(items)[i]` for its item: `run` answers a list in order, one result per item, and
    sees the items in the order the calls arrived. An exception from `run` is raised in every caller of that batch."""

    def __init__(self, run: Callable[[list[Item]], Sequence[Result]], max_batch: int = 256) -> None:
        self._run = run
        self._max_batch = max_batch
        self._ready = threading.Condition()
        self._queued: list[_Slot[Item, Result]] = []
        self._busy = False

    def commit(self, item: Item) -> Result:
        slot: _Slot[Item, Result] = _Slot(item)
        with self._ready:
            self._queued.append(slot)
        while True:
            with self._ready:
                self._ready.wait_for(lambda: slot.done or not self._busy)
                if slot.done:
                    break
                self._busy = True  # this caller runs the next batch: its own slot and whoever queued before it
                batch, self._queued = self._queued[:self._max_batch], self._queued[self._max_batch:]
            try:
                results = self._run([queued.item for queued in batch])
                for queued, result in zip(batch, results, strict=True):
                    queued.result = result
            except BaseException as error:  # every caller of the batch raises it; none is left waiting
                for queued in batch:
                    queued.error = error
            finally:
                with self._ready:
                    for queued in batch:
                        queued.done = True
                    self._busy = False
                    self._ready.notify_all()
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]
