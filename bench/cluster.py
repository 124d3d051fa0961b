"""Cluster overhead and scaling, on logical GPUs (CPU trainings), for a tiny bundle and byte budget.

1. Overhead: submit→completed latency on a local cluster minus the wall time of the same stage functions run in
   this process, the same minute, on an equal bundle (the probe, runner start-up and training are in both, so what
   is left is the cluster's own: queue, task dispatch, object store, store writes). Target ≤ 3 s.
2. Scaling: completed submissions per minute with 1, 2, 4, ... logical-GPU nodes (ray.cluster_utils, `--nodes`),
   each node with two logical CPUs and the runner on one thread, so each training is bound to one core. Targets:
   2 nodes ≥ 1.8×, 4 nodes ≥ 3.4× one node. Two logical CPUs per node let a training and a CPU stage share it
   without Ray killing and restarting idle workers between stages (it keeps about one worker per logical CPU), as on
   any real GPU node. Every training is CPU work here, so the machine bounds it: the same stages n at a time in
   plain processes vs. one at a time, without Ray, measured first, is the ceiling this machine allows right now
   (other load on it shows there). The simulated head runs without the web dashboard: the dashboard's UI is the one
   head service the scheduling path never touches (metrics still flow through each node's agent). The GCS, the store
   and the scheduler stay: they are the cluster's own cost. The bench polls each submission twice a second, as a
   client. Each configuration prints the mean seconds of every step of a submission (queued, claimed, each stage).

   Where the cores come from decides what the ratio means. By default every process shares every core of this
   machine (on a small machine a lower bound: one node has spare cores for the cluster's own processes, more nodes
   have none). `--pin` gives the head and each node cores of their own (CPU affinity, set before each node's raylet
   starts and inherited by its workers and sandboxed runners; the ceiling's processes get the same cores), as real
   machines each bring their own: `--head-cores` for the GCS, store and scheduler, `--cores-per-node` for a node's
   training and CPU stages. When the machine has fewer cores than the largest configuration needs, it says so and
   falls back to shared cores for every configuration, so the ratios still compare like with like.

    python bench/cluster.py [--byte-budget 20000] [--submissions 8] [--repeats 3] [--nodes 1,2]
    python bench/cluster.py --pin --nodes 1,2,4 [--head-cores 2] [--cores-per-node 2]   # 10 cores or more
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from prism_ray.cluster import ClusterHandle, start_cluster, submit, wait
from prism_ray.config import AuditSettings, ClusterSettings, GateSettings, Settings
from prism_ray.data.dataset import open_dataset
from prism_ray.data.token_cache import load_token_stream
from prism_ray.evaluation.pipeline import evaluate
from prism_ray.intake.bundle import Bundle, check_contract

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "seed-tiny"


def tiny_bundle(tag: str) -> Bundle:
    """examples/seed-tiny on the bytes tokenizer; `tag` keeps every submission's code distinct (no duplicates)."""
    files = {path.name: path.read_bytes() for path in EXAMPLE.glob("*.py")}
    files["architecture.py"] += f"\n# {tag}\n".encode()
    files["prism.yaml"] = b"tokenizer: bytes\n"
    return check_contract(files)


def settings_for(cache_dir: Path, store_path: Path, byte_budget: int) -> Settings:
    # audits off: this measures submissions through the cluster, not their re-runs
    return Settings(cache_dir=cache_dir, byte_budget=byte_budget, runner_threads=1, gate=GateSettings(mode="off"),
                    audit=AuditSettings(mode="off"), cluster=ClusterSettings(store_path=store_path))


def in_process(bundle: Bundle, settings: Settings) -> float:
    """Seconds for the cluster's stage table run in this process, without Ray (`prism-ray eval`)."""
    started = time.monotonic()
    report = evaluate(bundle, settings)
    assert report.status == "completed", report.reasons
    return time.monotonic() - started


@dataclass(frozen=True)
class Cores:
    """CPU cores of their own for the head and for each simulated node (`--pin`)."""

    head: frozenset[int]
    nodes: tuple[frozenset[int], ...]

    def __str__(self) -> str:
        return f"head on cores {_span(self.head)}, " + ", ".join(f"node {n + 1} on {_span(cores)}"
                                                                  for n, cores in enumerate(self.nodes))


def pin_cores(nodes: int, head_cores: int, cores_per_node: int) -> Cores | None:
    """The cores for --pin, from those this process may use; None (shared cores) when there are too few."""
    available = sorted(os.sched_getaffinity(0))
    needed = head_cores + nodes * cores_per_node
    if len(available) < needed:
        print(f"--pin needs {head_cores} head core(s) + {nodes} node(s) × {cores_per_node} = {needed} cores; this "
              f"process may use {len(available)}: falling back to shared cores for every configuration")
        return None
    per_node = [frozenset(available[head_cores + n * cores_per_node:head_cores + (n + 1) * cores_per_node])
                for n in range(nodes)]
    return Cores(frozenset(available[:head_cores]), tuple(per_node))


@contextmanager
def pinned(cores: frozenset[int] | None) -> Iterator[None]:
    """This process (and what it starts meanwhile, which inherits it) on `cores`; None leaves it as it is."""
    if cores is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _span(cores: frozenset[int]) -> str:
    low, high = min(cores), max(cores)
    return str(low) if low == high else f"{low}-{high}" if len(cores) == high - low + 1 else ",".join(map(str, cores))


def machine_ceiling(work: Path, byte_budget: int, submissions: int, widths: list[int],
                    cores: Cores | None) -> dict[int, float]:
    """Throughput ratio of the same stages run n at a time vs. one at a time, in plain processes (each on one
    node's cores when pinned), for every n in `widths` above 1."""
    settings = settings_for(work / "cache", work / "unused.duckdb", byte_budget)
    started = time.monotonic()
    _run_all([tiny_bundle(f"ceiling-1-{n}") for n in range(submissions)], settings, cores and cores.nodes[0])
    serial = time.monotonic() - started
    print(f"  machine ceiling: {submissions} runs one at a time {serial:6.2f} s")
    ceilings = {}
    for width in (width for width in widths if width > 1):
        bundles = [tiny_bundle(f"ceiling-{width}-{n}") for n in range(submissions)]
        fork = multiprocessing.get_context("fork")  # before Ray starts in this process
        workers = [fork.Process(target=_run_all, args=(bundles[first::width], settings,
                                                         cores and cores.nodes[first])) for first in range(width)]
        started = time.monotonic()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert all(worker.exitcode == 0 for worker in workers), [worker.exitcode for worker in workers]
        ceilings[width] = serial / (time.monotonic() - started)
        print(f"  machine ceiling: {submissions} runs {width} at a time ÷ {ceilings[width]:.2f}")
    return ceilings


def _run_all(bundles: list[Bundle], settings: Settings, cores: frozenset[int] | None) -> None:
    with pinned(cores):
        for bundle in bundles:
            in_process(bundle, settings)


def run_one(handle: ClusterHandle, tag: str) -> tuple[float, float]:
    """(submit→completed seconds, the report's own wall seconds)."""
    started = time.monotonic()
    record = submit(handle, "bench", f"{tag}.zip", tiny_bundle(tag))
    record = wait(handle, record.id, timeout=600)
    latency = time.monotonic() - started
    assert record is not None and record.status == "completed", record
    [run] = ray.get(handle.store.runs.remote(record.id))
    return latency, run.report.wall_seconds


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


def throughput(work: Path, nodes: int, byte_budget: int, submissions: int, cores: Cores | None) -> float:
    """Completed submissions per minute on `nodes` logical-GPU nodes; with `cores`, the head's processes (and this
    driver) on the head's cores and each node's raylet, workers and sandboxed runners on that node's."""
    label = "pinned" if cores else "shared"
    with pinned(cores and cores.head):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0, "resources": {"head": 1},
                                                                "include_dashboard": False})
        try:
            for node in range(nodes):
                with pinned(cores and cores.nodes[node]):  # inherited by the raylet and everything it starts
                    cluster.add_node(num_cpus=2, num_gpus=1)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address)
            handle = start_cluster(cluster.address, settings_for(work / "cache",
                                                                 work / f"scale-{label}-{nodes}.duckdb", byte_budget))
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
            steps.setdefault(before.stage or before.kind, []).append(after.created_at - before.created_at)
    return "  ".join(f"{name} {statistics.mean(values):.2f}" for name, values in steps.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--byte-budget", type=int, default=20_000)
    parser.add_argument("--submissions", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nodes", type=lambda text: sorted({int(n) for n in text.split(",")}), default=[1, 2],
                        help="node counts to compare, e.g. 1,2,4 (the first is the baseline)")
    parser.add_argument("--pin", action="store_true", help="cores of their own for the head and each node")
    parser.add_argument("--head-cores", type=int, default=2)
    parser.add_argument("--cores-per-node", type=int, default=2)
    args = parser.parse_args()
    cores = pin_cores(max(args.nodes), args.head_cores, args.cores_per_node) if args.pin else None
    arrangement = f"pinned: {cores}" if cores else f"shared: every process on all {len(os.sched_getaffinity(0))} cores"
    with tempfile.TemporaryDirectory(prefix="prism-bench-cluster-") as tmp:
        work = Path(tmp)
        load_token_stream(open_dataset(Settings().data_dir), "train", "bytes", work / "cache")
        print(f"tiny bundle (examples/seed-tiny on bytes), byte budget {args.byte_budget:,}; {arrangement}")
        ceilings = machine_ceiling(work, args.byte_budget, args.submissions, args.nodes, cores)
        overhead(work, args.byte_budget, args.repeats)
        print(f"scaling ({'pinned' if cores else 'shared'} cores):")
        rates = {nodes: throughput(work, nodes, args.byte_budget, args.submissions, cores) for nodes in args.nodes}
    base = args.nodes[0]
    for nodes in args.nodes[1:]:
        ratio = rates[nodes] / rates[base]
        ceiling = ceilings.get(nodes, 1.0) / ceilings.get(base, 1.0)
        target = {2: " (target ≥ 1.8×)", 4: " (target ≥ 3.4×)"}.get(nodes, "") if base == 1 else ""
        print(f"scaling, {'pinned' if cores else 'shared'} cores: {nodes} nodes ÷ {base} = {ratio:.2f}×{target}; "
              f"this machine allows {ceiling:.2f}× now, so the cluster reaches {ratio / ceiling:.0%} of it")


if __name__ == "__main__":
    main()
