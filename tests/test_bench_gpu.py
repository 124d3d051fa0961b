"""bench/gpu.py stays runnable where CI runs: its CPU smoke mode prints every row of its one table with numbers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.sandbox

SPEED_ROWS = ("bare loop", "bare + scorer forward", "eval own forward", "eval with_logits", "eval no-op trainer",
              "stream protocol only")


def test_gpu_bench_quick_on_cpu_prints_the_table():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--device", "cpu", "--quick"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    table = {}
    for line in done.stdout.splitlines():
        if line.startswith("| ") and not line.startswith("| measure"):
            label, value, ratio, note = (cell.strip() for cell in line.strip("|").split(" | "))
            table[label] = (value, ratio, note)
    for name in SPEED_ROWS:
        value, ratio, _ = table[f"{name}, tokens/s"]
        assert float(value) > 0 and float(ratio) > 0, (name, value, ratio)
    assert table["bare loop, tokens/s"][1] == "1.000"
    assert table["peak GPU memory"][0] == "n/a"  # measured on CUDA only
    for name in ("own forward", "with_logits"):
        value, difference, note = table[f"bpb twice, {name}"]
        first, second = (float(bpb) for bpb in value.split(" / "))
        assert 0 < first < 20 and 0 < second < 20
        assert float(difference) == 0.0 and note.endswith(": ok"), note  # CPU runs are bit-identical
    assert "parameters" in done.stdout and "sandbox:" in done.stdout
