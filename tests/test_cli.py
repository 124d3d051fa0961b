"""`prism-ray eval` end to end: real subprocesses, the embedded data, the three examples."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXAMPLES, write_bundle
from miners import QUICKSTART_YAML
from prism_ray.config import EMBEDDED_DATA_DIR

CLI = [sys.executable, "-m", "prism_ray.cli.command"]


def eval_json(*args: str, cache_dir: Path, extra_env: dict | None = None) -> tuple[int, dict, str]:
    env = {"PATH": "/usr/bin:/bin", "PRISM_CACHE_DIR": str(cache_dir), "HOME": str(cache_dir),
           "PRISM_SCORING_HELDOUT_BYTE_BUDGET": "10000",
           **(extra_env or {})}
    done = subprocess.run([*CLI, "eval", *args, "--json"], capture_output=True, text=True, env=env, timeout=300)
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout + done.stderr  # stdout is exactly one JSON object
    return done.returncode, json.loads(lines[0]), done.stderr


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.sandbox
@pytest.mark.parametrize("example", ["tiny-gpt", "byte-lm", "seed-tiny"])
def test_examples_score_on_embedded_data(example, cache_dir):
    code, report, _ = eval_json(str(EXAMPLES / example), "--byte-budget", "10000", "--contract", cache_dir=cache_dir)
    assert code == 0, report
    assert [(check["world_size"], check["passed"]) for check in report["contract"]] == [(2, True)], report["contract"]
    assert report["status"] == "completed" and report["stage"] == "score"
    assert report["bytes_scored"] >= 10000 and report["stopped_reason"] == "byte_budget"
    assert 0 < report["bpb"] < 20 and 0 < report["final_score"] < 1
    assert report["data"]["pinned"] and report["data"]["path"] == str(EMBEDDED_DATA_DIR)
    assert report["gate"]["status"] == "skipped"
    assert report["curve"][-1]["bytes"] == report["bytes_scored"]
    for key in ("tokens_scored", "batches", "batch_size", "seq_len", "tokenizer", "vocab_size", "model_params",
                "seed", "step0_loss", "wall_seconds", "tokens_per_second"):
        assert report[key] is not None, key
    assert (Path(report["run_dir"]) / "report.json").is_file()


@pytest.mark.sandbox
def test_the_prism_quickstart_bundle_scores(tmp_path, cache_dir):
    """PRISM's quickstart: its prism.yaml verbatim, its TinyModel (seed-tiny's architecture.py) and a plain loop."""
    bundle = tmp_path / "quickstart"
    shutil.copytree(EXAMPLES / "seed-tiny", bundle)
    (bundle / "prism.yaml").write_text(QUICKSTART_YAML)
    code, report, _ = eval_json(str(bundle), "--byte-budget", "5000", cache_dir=cache_dir)
    assert code == 0, report
    assert (report["status"], report["tokenizer"]) == ("completed", "gpt2") and 0 < report["final_score"] < 1


def test_rejected_bundle_exits_1_with_reasons(tmp_path, cache_dir):
    bundle = write_bundle(tmp_path / "b", "import os\ndef build_model(ctx):\n    return None\n", "def train(ctx):\n    pass\n")
    code, report, _ = eval_json(str(bundle), cache_dir=cache_dir)
    assert code == 1
    assert report["status"] == "rejected"
    assert report["reasons"][0]["rule"].startswith("sandbox:")
    assert report["reasons"][0]["file"] == "architecture.py" and report["reasons"][0]["line"] == 1


def test_usage_error_exits_2(tmp_path, cache_dir):
    done = subprocess.run([*CLI, "eval", str(tmp_path / "missing")], capture_output=True, text=True)
    assert done.returncode == 2


@pytest.mark.parametrize("args,rule", [
    (["MISSING"], "usage:no_bundle"),
    ([str(EXAMPLES / "seed-tiny"), "--byte-budget", "-5"], "usage:bad_arguments"),
    ([str(EXAMPLES / "seed-tiny"), "--no-such-option"], "usage:bad_arguments"),
    ([str(EXAMPLES / "seed-tiny"), "--device", "cuda:7"], "usage:device"),  # this machine has no such GPU
    ([str(EXAMPLES / "seed-tiny"), "--device", "tpu"], "usage:device"),
])
def test_json_usage_errors_are_one_object(tmp_path, cache_dir, args, rule):
    """`eval --json` prints exactly one JSON object for every outcome, a wrong command line included (exit 2)."""
    args = [str(tmp_path / "missing") if arg == "MISSING" else arg for arg in args]
    code, report, stderr = eval_json(*args, cache_dir=cache_dir)
    assert code == 2, stderr
    assert report["status"] == "usage_error" and report["reasons"][0]["rule"] == rule, report


def test_json_hostile_prism_yaml_is_a_rejection_not_a_traceback(tmp_path, cache_dir):
    bundle = write_bundle(tmp_path / "b", "def build_model(ctx):\n    return None\n", "def train(ctx):\n    pass\n")
    (bundle / "prism.yaml").write_text("x: " + "[" * 5000 + "]" * 5000 + "\n")
    code, report, stderr = eval_json(str(bundle), cache_dir=cache_dir)
    assert code == 1 and report["status"] == "rejected" and report["stage"] == "intake"
    assert report["reasons"][0]["rule"] == "contract:prism_yaml" and "Traceback" not in stderr


def test_tampered_shard_is_refused(tmp_path, cache_dir):
    data = tmp_path / "data"
    shutil.copytree(EMBEDDED_DATA_DIR, data)
    shard = sorted((data / "train").glob("*.jsonl.gz"))[0]
    lines = gzip.decompress(shard.read_bytes()).splitlines()
    record = json.loads(lines[0])
    record["text"] = record["text"].replace("Python", "Pythom", 1)
    lines[0] = json.dumps(record).encode()
    shard.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    code, report, _ = eval_json(str(EXAMPLES / "seed-tiny"), "--data", str(data), cache_dir=cache_dir)
    assert code == 1
    assert report["status"] == "failed" and report["stage"] == "data"
    assert report["reasons"][0]["rule"] == "data:tampered"


@pytest.mark.sandbox
def test_unpinned_directory_is_accepted(tmp_path, cache_dir):
    data = tmp_path / "unpinned"
    (data / "train").mkdir(parents=True)
    docs = [json.dumps({"text": f"Document {i}: the quick brown fox jumps over the lazy dog. " * 20}) for i in range(15)]
    (data / "train" / "part.jsonl").write_text("\n".join(docs) + "\n")
    code, report, _ = eval_json(str(EXAMPLES / "byte-lm"), "--data", str(data), "--byte-budget", "0",
                                cache_dir=cache_dir)
    assert code == 0, report
    assert report["data"]["pinned"] is False and report["data"]["fingerprint"].startswith("unpinned-")
    assert report["stopped_reason"] == "stream_exhausted"


def test_eval_help_shows_each_default_and_its_variable():
    done = subprocess.run([*CLI, "eval", "--help"], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "COLUMNS": "200", "TERM": "dumb"})
    assert done.returncode == 0, done.stderr
    for shown in ("200,000 bytes, or PRISM_BYTE_BUDGET", "1337, or PRISM_SEED", "or PRISM_TIME_LIMIT",
                  "or PRISM_DEVICE", "the embedded Python docs"):
        assert shown in done.stdout, (shown, done.stdout)


def test_a_rejected_bundles_report_shows_only_what_is_known(tmp_path, cache_dir):
    bundle = write_bundle(tmp_path / "b", "def build_model(ctx):\n    return None\n", "def train(ctx):\n    pass\n",
                          prism_yaml="tokenizer: llama\n")
    done = subprocess.run([*CLI, "eval", str(bundle)], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PRISM_CACHE_DIR": str(cache_dir), "HOME": str(cache_dir)})
    assert done.returncode == 1
    assert "rejected at stage intake" in done.stdout and "contract:prism_yaml" in done.stdout
    assert "—" not in done.stdout and "bytes scored" not in done.stdout, done.stdout


def test_the_cli_leaderboard_never_cuts_an_id_and_shows_why_it_is_ordered():
    import io

    from rich.console import Console

    from prism_ray.cli.client_commands import print_leaderboard

    hotkey, submission = "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty", "sub_6f445c795080469bb79d129f9d285031"
    board = {"entries": [{"rank": 1, "hotkey": hotkey, "name": "memorised", "bpb": 5.2, "final_score": 0.05,
                          "heldout_delta": None, "submission_id": submission, "flags": ["memorisation_gap ×0.31"]}]}
    out = io.StringIO()
    print_leaderboard(board, Console(file=out, width=80))
    text = out.getvalue()
    assert hotkey in text and submission in text and "memorisation_gap ×0.31" in text
    assert "a lower bpb can rank below a higher one" in " ".join(text.split())
