"""Group commit (prism_ray/group_commit.py): concurrent callers each get their own item's result, the callers that
arrive while a call is in flight share the next one, and a failing call fails exactly its own callers."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from prism_ray.group_commit import GroupCommit


class Recorder:
    """A list call that blocks its first call until released, so the test decides what queues behind it."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.release = threading.Event()
        self.fail_on = fail_on

    def __call__(self, items: list[str]) -> list[str]:
        self.calls.append(items)
        if len(self.calls) == 1:
            assert self.release.wait(30)
        if self.fail_on in items:
            raise RuntimeError(f"store refused {self.fail_on}")
        return [item.upper() for item in items]


def waiting(commit: GroupCommit, count: int) -> None:
    """Until `count` callers are queued behind the call in flight."""
    for _ in range(3000):
        if len(commit._queued) >= count:
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"{count} callers never queued")


def test_callers_arriving_during_a_call_share_the_next_and_each_gets_its_own_result():
    run = Recorder()
    commit = GroupCommit(run)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(commit.commit, "a")
        while not run.calls:
            threading.Event().wait(0.01)
        later = [pool.submit(commit.commit, item) for item in "bcdefg"]
        waiting(commit, 6)
        run.release.set()
        assert first.result(30) == "A"
        assert [future.result(30) for future in later] == list("BCDEFG")
    assert run.calls[0] == ["a"] and sorted(run.calls[1]) == list("bcdefg") and len(run.calls) == 2


def test_a_failed_call_raises_in_its_own_callers_only():
    run = Recorder(fail_on="c")
    commit = GroupCommit(run)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(commit.commit, "a")
        while not run.calls:
            threading.Event().wait(0.01)
        batch = [pool.submit(commit.commit, item) for item in "bc"]
        waiting(commit, 2)
        run.release.set()
        assert first.result(30) == "A"
        for future in batch:
            with pytest.raises(RuntimeError, match="store refused c"):
                future.result(30)
    assert commit.commit("d") == "D"  # nobody is left holding the commit


def test_batches_are_bounded():
    run = Recorder()
    commit = GroupCommit(run, max_batch=2)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(commit.commit, "a")
        while not run.calls:
            threading.Event().wait(0.01)
        later = [pool.submit(commit.commit, item) for item in "bcde"]
        waiting(commit, 4)
        run.release.set()
        assert [future.result(30) for future in [first, *later]] == list("ABCDE")
    assert [len(call) for call in run.calls] == [1, 2, 2]
