"""Group commit (prism_ray/backend/group_commit.py): concurrent callers each get their own item's result, the callers that
arrive while a call is in flight share the next one, and a failing call fails exactly its own callers."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from prism_ray.backend.group_commit import GroupCommit


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


def burst(pool: ThreadPoolExecutor, commit: GroupCommit, run: Recorder, later: str) -> list[Future]:
    """Commit "a", then each item of `later` while "a"'s call is in flight; release "a" once all of them queue behind
    it. The futures, "a"'s first."""
    first = pool.submit(commit.commit, "a")
    for _ in range(3000):
        if run.calls:
            break
        threading.Event().wait(0.01)
    futures = [first, *(pool.submit(commit.commit, item) for item in later)]
    for _ in range(3000):
        if len(commit._queued) >= len(later):
            break
        threading.Event().wait(0.01)
    else:
        raise AssertionError(f"{len(later)} callers never queued")
    run.release.set()
    return futures


def test_callers_arriving_during_a_call_share_the_next_and_each_gets_its_own_result():
    run = Recorder()
    commit = GroupCommit(run)
    with ThreadPoolExecutor(8) as pool:
        assert [future.result(30) for future in burst(pool, commit, run, "bcdefg")] == list("ABCDEFG")
    assert run.calls[0] == ["a"] and sorted(run.calls[1]) == list("bcdefg") and len(run.calls) == 2


def test_a_failed_call_raises_in_its_own_callers_only():
    run = Recorder(fail_on="c")
    commit = GroupCommit(run)
    with ThreadPoolExecutor(4) as pool:
        first, *batch = burst(pool, commit, run, "bc")
        assert first.result(30) == "A"
        for future in batch:
            with pytest.raises(RuntimeError, match="store refused c"):
                future.result(30)
    assert commit.commit("d") == "D"  # nobody is left holding the commit


def test_batches_are_bounded():
    run = Recorder()
    commit = GroupCommit(run, max_batch=2)
    with ThreadPoolExecutor(8) as pool:
        assert [future.result(30) for future in burst(pool, commit, run, "bcde")] == list("ABCDE")
    assert [len(call) for call in run.calls] == [1, 2, 2]
