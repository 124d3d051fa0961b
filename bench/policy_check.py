"""Cost of the static policy per bundle: the first check in a process (it imports the allowed modules and walks
their namespaces) and every later one (cached lookups), against parsing the same files with `ast.parse`, measured
in the same run. Target: a warm check within a few times the parse, milliseconds per bundle.

    python bench/policy_check.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import ast
import statistics
import time
from pathlib import Path

from prism_ray.intake.bundle import load_bundle
from prism_ray.policy import inspect

ROOT = Path(__file__).resolve().parent.parent
BUNDLES = sorted([*(ROOT / "examples").iterdir(), *(ROOT / "tests" / "sandbox_cases").iterdir()])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    repeats = parser.parse_args().repeats
    bundles = {path.name: load_bundle(path) for path in BUNDLES if path.is_dir()}
    started = time.perf_counter()
    inspect(next(iter(bundles.values())))
    print(f"first check in this process (imports torch, numpy and walks them): {time.perf_counter() - started:.2f} s")
    print(f"{'bundle':14s} {'lines':>6s} {'parse ms':>9s} {'check ms':>9s} {'ratio':>6s}")
    for name, bundle in bundles.items():
        sources = bundle.python_files.values()
        parse = _median(lambda sources=sources: [ast.parse(source) for source in sources], repeats)
        check = _median(lambda bundle=bundle: inspect(bundle), repeats)
        lines = sum(source.count("\n") for source in sources)
        print(f"{name:14s} {lines:6d} {parse * 1e3:9.2f} {check * 1e3:9.2f} {check / parse:6.1f}")


def _median(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


if __name__ == "__main__":
    main()
