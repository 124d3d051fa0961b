"""The gate inside `prism-ray eval`, against the real OpenAI-compatible stub server on loopback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import write_bundle
from miners import bigram_architecture, learner_loop
from openai_stub import openai_stub_fixture, openai_stub_server_fixture  # noqa: F401
from prism_ray.config import Settings
from prism_ray.evaluation.pipeline import evaluate

REJECT = {"verdict": "reject", "confidence": 0.9, "reasons": [
    {"rule": "fake_training", "message": "the loop never updates the model it is scored on", "file": "training.py",
     "line": 7}]}
ALLOW = {"verdict": "allow", "reasons": [], "confidence": 0.95}


@pytest.fixture
def settings(openai_stub, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-test-eval")
    settings = Settings(byte_budget=5_000, cache_dir=tmp_path / "cache")
    settings.gate.base_url = openai_stub.base_url
    settings.gate.backoff_s = 0.01
    settings.scoring.heldout_byte_budget = 5_000
    return settings


@pytest.mark.sandbox
def test_allowed_bundle_trains_and_reports_the_gate(openai_stub, settings, tmp_path):
    openai_stub.script([ALLOW])
    bundle = write_bundle(tmp_path / "b", bigram_architecture(), learner_loop(seq_len=64), "tokenizer: bytes\n")
    report = evaluate(bundle, settings)
    assert report.status == "completed", report.reasons
    assert report.gate.status == "allowed" and len(openai_stub.requests) == 1


def test_rejected_bundle_does_no_training_work(openai_stub, settings, tmp_path):
    openai_stub.script([REJECT])
    bundle = write_bundle(tmp_path / "b", bigram_architecture(), learner_loop(seq_len=64), "tokenizer: bytes\n")
    report = evaluate(bundle, settings)
    assert report.status == "rejected" and report.stage == "gate"
    reason = report.reasons[0]
    assert (reason.rule, reason.file, reason.line) == ("gate:fake_training", "training.py", 7)
    assert report.batches == 0
    assert not (settings.cache_dir / "runs").exists()  # no run dir: the trainer and scorer were never launched


def test_eval_cli_surfaces_gate_reasons(openai_stub, tmp_path):
    openai_stub.script([REJECT])
    bundle = write_bundle(tmp_path / "b", bigram_architecture(), learner_loop(seq_len=64), "tokenizer: bytes\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PRISM_CACHE_DIR": str(tmp_path / "cache"),
           "OPENROUTER_API_KEY": "sk-test-cli", "PRISM_GATE_BASE_URL": openai_stub.base_url}
    done = subprocess.run([sys.executable, "-m", "prism_ray.cli.command", "eval", str(bundle), "--json"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["status"] == "rejected" and report["reasons"][0]["rule"] == "gate:fake_training"
    # --gate forces the gate on: without a key (and no cached verdict) the submission is held, never allowed.
    no_gate = subprocess.run([sys.executable, "-m", "prism_ray.cli.command", "eval", str(bundle), "--json", "--gate"],
                             capture_output=True, text=True, timeout=300,
                             env={**env, "OPENROUTER_API_KEY": "", "PRISM_CACHE_DIR": str(tmp_path / "fresh")})
    held = json.loads(no_gate.stdout)
    assert no_gate.returncode == 1 and held["status"] == "held" and held["reasons"][0]["rule"] == "gate:no_api_key"


def test_a_held_report_prints(tmp_path):
    """`eval --gate` with no API key ends `held`; the human-readable report must print it, not crash on it."""
    bundle = write_bundle(tmp_path / "b", bigram_architecture(), learner_loop(seq_len=64), "tokenizer: bytes\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PRISM_CACHE_DIR": str(tmp_path / "cache"),
           "OPENROUTER_API_KEY": "", "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "prism_ray.cli.command", "eval", str(bundle), "--gate"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout.startswith("held at stage gate") and "gate:no_api_key" in done.stdout
