"""One `evaluate` for bench/harness_overhead.py, with whichever prism_ray PYTHONPATH holds (this checkout's or an
older commit's), reported as one JSON line: the report's tokens/s and the CPU time of the stream.

CPU time is that of this process and every descendant (the sandboxed runners), read from /proc at the first loss
record and then at most every MARK_EVERY seconds, up to the last such mark: a window of whole batches that every
harness version reports the same way (through the `progress` callback of `evaluate`), and a figure that other load on
a shared machine moves much less than wall time.
Only names both versions have are used here; settings come from PRISM_* variables.

    python bench/eval_driver.py BUNDLE
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

from prism_ray.config import Settings
from prism_ray.evaluation.pipeline import evaluate

TICKS = os.sysconf("SC_CLK_TCK")
MARK_EVERY = 0.2  # seconds between two CPU marks of the window


def tree_cpu_seconds(root: int) -> float:
    """user + system time of `root` and its live descendants, all threads, in seconds."""
    children: dict[int, list[int]] = defaultdict(list)
    ticks: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                text = stat.read()
        except OSError:  # exited while we looked
            continue
        fields = text[text.rindex(")") + 2:].split()  # after the command name, which may hold spaces
        pid = int(entry.name)
        children[int(fields[1])].append(pid)
        ticks[pid] = int(fields[11]) + int(fields[12])
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += ticks.get(pid, 0)
        stack.extend(children.get(pid, ()))
    return total / TICKS


def main() -> None:
    marks: dict[str, tuple[float, float, int]] = {}

    def progress(state) -> None:
        # A walk of /proc costs about 1 ms of CPU in this process, beside the runners: once per record it would slow
        # an overhead-bound stream by a batch's worth of work. At most every MARK_EVERY seconds it costs well under 1%.
        now = time.perf_counter()
        if "first" in marks and now - marks["last"][1] < MARK_EVERY:
            return
        mark = (tree_cpu_seconds(os.getpid()), now, state.batches)
        marks.setdefault("first", mark)
        marks["last"] = mark

    report = evaluate(Path(sys.argv[1]), Settings(), progress=progress)
    none = (0.0, 0.0, 0)
    (cpu_first, wall_first, batch_first), (cpu_last, wall_last, batch_last) = marks.get("first", none), \
        marks.get("last", none)
    print(json.dumps({
        "status": report.status,
        "reasons": [f"{reason.rule}: {reason.message[:500]}" for reason in report.reasons],
        "tokens_per_second": report.tokens_per_second,
        "targets_per_batch": report.tokens_scored / report.batches if report.batches else 0,
        "window_batches": batch_last - batch_first,
        "window_cpu_seconds": cpu_last - cpu_first,
        "window_seconds": wall_last - wall_first,
    }))


if __name__ == "__main__":
    main()
