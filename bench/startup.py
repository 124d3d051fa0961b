"""The fixed cost of one `prism-ray eval`: what a run costs beyond its stream, before and after a change.

Each sample is a fresh process that evaluates the overhead-bound count bundle (bench/harness_overhead.py's byte
bigram) on 2,000 bytes of the embedded data, as `prism-ray eval` does, with the gate off. Printed per variant, as
medians over the rounds (interleaved, so load drifts hit every variant alike):
- wall: process start to exit; stream: the scored stream itself (first batch request to last record);
  fixed = wall − stream, which the issue's target (≤ 2 s on CPU) is about;
- check and train: the stages' own clocks; busy CPU: every core's busy time over the sample (/proc/stat), which
  counts the sandboxed runners but also any other load, hence the load average beside it.
Variants: this checkout and `--old-commit` (exported with `git archive`), each with the multi-GPU contract check off
and on (PRISM_CONTRACT_WORLD_SIZES "" and "2"). Each variant's first run is a warm-up (token cache, the policy's
remembered verdicts) and is not counted: a node evaluates many bundles.

    python bench/startup.py [--rounds 5] [--old-commit c24a265] [--no-old]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness_overhead import REPO, WORKLOADS, export_old, load  # noqa: E402

OLD_COMMIT = "c24a265"  # the harness before the start-up work of issue #24


def child(bundle: str) -> None:
    """`--child BUNDLE`: one evaluate in this process; one JSON line."""
    from prism_ray.config import Settings
    from prism_ray.evaluation.pipeline import evaluate

    report = evaluate(Path(bundle), Settings())
    print(json.dumps({"status": report.status, "reasons": [r.rule for r in report.reasons],
                      "timings": report.timings, "stream": report.train_seconds or 0.0}))


def busy_seconds() -> float:
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def sample(tree: Path, bundle: Path, cache: Path, contract: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "PRISM_GATE_MODE": "off", "PRISM_BYTE_BUDGET": "2000",
           "PRISM_CACHE_DIR": str(cache), "PRISM_CONTRACT_WORLD_SIZES": contract}
    busy, started = busy_seconds(), time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", str(bundle)], env=env, capture_output=True,
                          text=True, cwd=tree)
    wall, busy = time.perf_counter() - started, busy_seconds() - busy
    if done.returncode != 0:
        raise SystemExit(f"the eval failed under {tree}:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["status"] != "completed":
        raise SystemExit(f"the eval under {tree} did not complete: {result}")
    return {"wall": wall, "stream": result["stream"], "fixed": wall - result["stream"],
            "check": result["timings"].get("check", 0.0), "train": result["timings"].get("train", 0.0), "busy": busy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the table shows medians")
    parser.add_argument("--old-commit", default=OLD_COMMIT, help="the commit to compare with")
    parser.add_argument("--no-old", action="store_true", help="this checkout only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    with tempfile.TemporaryDirectory(prefix="prism-startup-") as scratch_dir:
        scratch = Path(scratch_dir)
        bundle = WORKLOADS["count"].write_bundle(scratch / "count")
        trees = {"new": REPO}
        if not args.no_old:
            old, note = export_old(scratch, args.old_commit)
            print(note)
            if old is not None:
                trees[f"old ({args.old_commit})"] = old
        variants = [(name, tree, contract) for name, tree in trees.items() for contract in ("", "2")]
        results: dict[tuple[str, str], list[dict]] = {(name, contract): [] for name, _, contract in variants}
        for round_index in range(args.rounds + 1):
            for name, tree, contract in variants:
                measured = sample(tree, bundle, scratch / f"cache-{name[:3]}", contract)
                if round_index:  # round 0 warms each variant's caches
                    results[name, contract].append(measured)
            print(f"round {round_index}/{args.rounds} done, load {load()}", file=sys.stderr)
        print(f"{os.cpu_count()} cores, load average after: {load()}; medians of {args.rounds} rounds, seconds")
        print(f"{'variant':<24} {'contract':>8} {'wall':>6} {'stream':>6} {'fixed':>6} {'check':>6} {'train':>6} "
              f"{'busy CPU':>8}")
        for (name, contract), runs in results.items():
            median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            print(f"{name:<24} {contract or 'off':>8} {median['wall']:6.2f} {median['stream']:6.2f} "
                  f"{median['fixed']:6.2f} {median['check']:6.2f} {median['train']:6.2f} {median['busy']:8.2f}")


if __name__ == "__main__":
    main()
