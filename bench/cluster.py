"""Cluster overhead and scaling, on logical GPUs (CPU trainings), for a tiny bundle and byte budget.

1. Overhead: submit→completed latency on a local cluster minus the wall time of the same stage functions run in
   this process, the same minute, on an equal bundle (the probe, runner start-up and training are in both, so what
   is left is the cluster's own: queue, task dispatch, object store, store writes). Target ≤ 3 s.
2. Scaling: completed submissions per minute with one vs. two logical-GPU nodes (ray.cluster_utils), each node
   with its own logical CPUs and the runner on one thread, so each training is bound to one core. Target ≥ 1.8×.
   Two logical CPUs per node let a training and a CPU stage share it without Ray killing and restarting idle
   workers between stages (it keeps about one worker per logical CPU), as on any real GPU node. Every
   training is CPU work here, so the machine bounds it: the same stages in two processes vs. one, without Ray,
   measured first, is the ceiling this machine allows right now (other load on it shows there). The simulated
   head runs without the web dashboard: on a real cluster the head's services use the head machine's own CPUs,
   here every process shares the cores the two trainings need, and the dashboard's UI is the one head service
   the scheduling path never touches (metrics still flow through each node's agent). The GCS, the store and the
   scheduler stay: they are the cluster's own cost. The bench polls each submission twice a second, as a client.
   Scaling is measured twice, and the two arrangements bracket what real nodes (each with its own CPUs, the head
   with its own) would show; a faithful one needs a core for the head and one per node, more than two cores.
   With shared cores (the lower bound), both configurations run on every core of this machine, so one node has a
   spare core for the cluster's own processes and two nodes have none. With a core per node (the upper bound),
   the whole cluster runs on as many cores as it has GPU nodes (CPU affinity, inherited by every Ray process and
   sandboxed runner); the head's processes get no core of their own, and on a single core every hand-off between
   the trusted parent and the runner waits for a context switch, which slows one node more than two.

    python bench/cluster.py [--byte-budget 20000] [--submissions 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from prism_ray.bundle import Bundle, check_contract
from prism_ray.cluster import ClusterHandle, start_cluster, submit, wait
from prism_ray.cluster.stages import STAGES, Job, StageContext
from prism_ray.config import ClusterSettings, GateSettings, Settings
from prism_ray.data.dataset import open_dataset
from prism_ray.data.token_cache import load_token_stream

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "seed-tiny"


def tiny_bundle(tag: str) -> Bundle:
    """examples/seed-tiny on the bytes tokenizer; `tag` keeps every submission's code distinct (no duplicates)."""
    files = {path.name: path.read_bytes() for path in EXAMPLE.glob("*.py")}
    files["architecture.py"] += f"\n# {tag}\n".encode()
    files["prism.yaml"] = b"tokenizer: bytes\n"
    return check_contract(files)


def settings_for(cache_dir: Path, store_path: Path, byte_budget: int) -> Settings:
    return Settings(cache_dir=cache_dir, byte_budget=byte_budget, runner_threads=1, gate=GateSettings(mode="off"),
                    cluster=ClusterSettings(store_path=store_path))


def in_process(bundle: Bundle, settings: Settings) -> float:
    """Seconds for the cluster's stage functions run one after the other here, without Ray."""
    started = time.monotonic()
    ctx = StageContext(Job("bench", 1, "bench", time.time()), settings)
    payloads = {}
    for stage in STAGES:
        outcome, payloads[stage.name] = stage.run(ctx, bundle, *(payloads[name] for name in stage.needs))
        if outcome.verdict != "next":
            break
    assert outcome.verdict == "completed", outcome
    return time.monotonic() - started


def machine_ceiling(work: Path, byte_budget: int, submissions: int) -> float:
    """Throughput ratio of the same stages run two at a time vs. one at a time, in plain processes."""
    settings = settings_for(work / "cache", work / "unused.duckdb", byte_budget)
    bundles = [tiny_bundle(f"ceiling-{n}") for n in range(2 * submissions)]
    started = time.monotonic()
    for bundle in bundles[:submissions]:
        in_process(bundle, settings)
    serial = time.monotonic() - started
    started = time.monotonic()
    with ProcessPoolExecutor(2) as pool:  # forked before Ray starts in this process
        list(pool.map(in_process, bundles[submissions:], [settings] * submissions))
    ceiling = serial / (time.monotonic() - started)
    print(f"  machine ceiling: {submissions} runs one at a time {serial:6.2f} s, two at a time ÷ {ceiling:.2f}")
    return ceiling


def run_one(handle: ClusterHandle, tag: str) -> tuple[float, float]:
    """(submit→completed seconds, the report's own wall seconds)."""
    started = time.monotonic()
    record = submit(handle, "bench", f"{tag}.zip", tiny_bundle(tag))
    record = wait(handle, record.id, timeout=600)
    latency = time.monotonic() - started
    assert record is not None and record.status == "completed", record
    [run] = ray.get(handle.store.runs.remote(record.id))
    return latency, run["report"]["wall_seconds"]


def overhead(work: Path, byte_budget: int, repeats: int) -> None:
    settings = settings_for(work / "cache", work / "overhead.duckdb", byte_budget)
    handle = start_cluster(None, settings)
    print(handle.notice)
    try:
        run_one(handle, "warm-up")  # starts the Ray workers once, as a running cluster has them
        rows = []
        for repeat in range(repeats):
            local = in_process(tiny_bundle(f"local-{repeat}"), settings)
            latency, report_wall = run_one(handle, f"overhead-{repeat}")
            rows.append((latency, local))
            print(f"  submit→completed {latency:6.2f} s   same stages in-process {local:6.2f} s   "
                  f"report wall {report_wall:6.2f} s   overhead {latency - local:5.2f} s")
    finally:
        handle.close()
    median = statistics.median(latency - local for latency, local in rows)
    print(f"overhead (median of {repeats}): {median:.2f} s (target ≤ 3 s)")


def throughput(work: Path, nodes: int, byte_budget: int, submissions: int, core_per_node: bool) -> float:
    """Completed submissions per minute; with `core_per_node` the whole cluster (every Ray process and the sandboxed
    runners, which inherit CPU affinity) runs on `nodes` cores, as each real node brings its own CPUs."""
    every_core = os.sched_getaffinity(0)
    if core_per_node:
        os.sched_setaffinity(0, sorted(every_core)[:nodes])
    try:
        return _throughput(work, nodes, byte_budget, submissions, "core" if core_per_node else "shared")
    finally:
        os.sched_setaffinity(0, every_core)


def _throughput(work: Path, nodes: int, byte_budget: int, submissions: int, label: str) -> float:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0, "resources": {"head": 1},
                                                            "include_dashboard": False})
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=2, num_gpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        handle = start_cluster(cluster.address, settings_for(work / "cache", work / f"scale-{label}-{nodes}.duckdb",
                                                             byte_budget))
        try:
            warm = [submit(handle, "bench", f"warm-{n}.zip", tiny_bundle(f"warm-{label}-{nodes}-{n}")).id
                    for n in range(nodes)]
            for submission_id in warm:  # every node has started its workers
                wait(handle, submission_id, timeout=600)
            started = time.monotonic()
            ids = [submit(handle, "bench", f"{n}.zip", tiny_bundle(f"scale-{label}-{nodes}-{n}")).id
                   for n in range(submissions)]
            records = [wait(handle, submission_id, timeout=600, poll=0.5) for submission_id in ids]
            seconds = time.monotonic() - started
            assert all(record is not None and record.status == "completed" for record in records), records
            timeline = ray.get([handle.store.events.remote(submission_id) for submission_id in ids])
        finally:
            handle.stop()
    finally:
        ray.shutdown()
        cluster.shutdown()
    per_minute = submissions / seconds * 60
    print(f"  {nodes} logical-GPU node(s): {submissions} completed in {seconds:6.2f} s = {per_minute:5.1f} / min")
    print(f"    mean seconds per step: {phases(timeline)}")
    return per_minute


def phases(timelines: list[list[dict]]) -> str:
    """Mean seconds between consecutive events of a submission (queued, each stage from its start), to show where
    a configuration spends its time."""
    steps: dict[str, list[float]] = {}
    for events in timelines:
        for before, after in zip(events, events[1:], strict=False):
            steps.setdefault(before["stage"] or before["kind"], []).append(after["created_at"] - before["created_at"])
    return "  ".join(f"{name} {statistics.mean(values):.2f}" for name, values in steps.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--byte-budget", type=int, default=20_000)
    parser.add_argument("--submissions", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="prism-bench-cluster-") as tmp:
        work = Path(tmp)
        load_token_stream(open_dataset(Settings().data_dir), "train", "bytes", work / "cache")
        print(f"tiny bundle (examples/seed-tiny on bytes), byte budget {args.byte_budget:,}")
        ceiling = machine_ceiling(work, args.byte_budget, args.submissions)
        overhead(work, args.byte_budget, args.repeats)
        print("every node on all of this machine's cores:")
        one = throughput(work, 1, args.byte_budget, args.submissions, core_per_node=False)
        two = throughput(work, 2, args.byte_budget, args.submissions, core_per_node=False)
        print(f"scaling, shared cores: two nodes ÷ one node = {two / one:.2f}× (lower bound; this machine allows "
              f"{ceiling:.2f}× now, so the cluster reaches {two / one / ceiling:.0%} of it)")
        print("one core per node (CPU affinity):")
        one = throughput(work, 1, args.byte_budget, args.submissions, core_per_node=True)
        two = throughput(work, 2, args.byte_budget, args.submissions, core_per_node=True)
        print(f"scaling, a core per node: two nodes ÷ one node = {two / one:.2f}× (upper bound; target ≥ 1.8×)")


if __name__ == "__main__":
    main()
