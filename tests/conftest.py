"""Shared test helpers: real bundles on disk, real runner processes over synthetic token streams.

Where the tests of each part live (markers: pyproject.toml; the inner loop is `pytest -m "not cluster and not
browser"`, README "Contributing"):

    bundle.py, manifest_yaml.py       test_bundle, test_intake_fuzz (over HTTP)
    policy/                           test_sandbox (every rule), test_policy_attacks (escapes by reach)
    gate.py, gate_prompt.py           test_gate, test_gate_eval (inside `eval`)
    pipeline.py, cli.py (eval)        test_cli, test_gate_eval, test_heldout
    run.py, harness/                  test_runner, test_prequential, test_causality, test_probes, test_heldout,
                                      test_isolation, test_trust (the trainer attacks), test_graph_trust (the
                                      exporter attacks), test_operator_faults, test_session_frames (the parent's
                                      frame loop alone)
    graph/                            test_graph, test_graph_trust
    scoring.py, report.py, chunks.py  test_scoring, test_prequential, test_chunks
    data/                             test_data, test_token_cache, test_tokenizers
    store/                            test_store, test_audits, test_replicas, test_copies, test_copies_by_behaviour,
                                      test_store_failure, test_startup (a damaged or locked file)
    backend.py, group_commit.py       test_api, test_registry, test_group_commit
    read_model.py, queue_eta.py       test_read_model, test_api
    leaderboard.py, significance.py   test_leaderboard, test_decided_order, test_significance, test_ranking_views
    audit.py, replicas.py             test_audits, test_replicas, test_cluster (re-runs on real nodes)
    fingerprint.py, behaviour.py      test_copies, test_copies_by_behaviour, test_leaderboard (families)
    auth.py, registry.py              test_auth, test_registry
    faults.py, preflight.py           test_operator_faults, test_cluster_faults, test_startup
    cluster/                          test_scheduler (turn by turn), test_cluster, test_cluster_faults, test_restart
    service.py, demo.py               test_service, test_conformance, test_restart, test_docs (the demo)
    serve_app/                        test_api, test_http_limits, test_pages (Chromium), test_ranking_views,
                                      test_conformance (PRISM's clients), test_cluster_yaml (the proxy guard)
    docs/, README.md                  test_docs (every documented command), test_architecture_doc, test_bench_gpu

Helpers: miners.py (the bundles' code), api_helpers.py (signed requests, a served app, a fake scheduler),
cluster_helpers.py, serve_helpers.py (a real `prism-ray serve`), web_helpers.py, openai_stub.py, small_fs.py (tmpfs
disks), damage.py (damaged store files), prepare_reference.py.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np
import pytest

from prism_ray.evaluation.report import RunReport
from prism_ray.harness.isolation import SandboxPolicy
from prism_ray.harness.records import RunSpec, TrainOutcome
from prism_ray.harness.session import run_session
from prism_ray.intake.bundle import Bundle, load_bundle

# The multi-GPU contract check (a short run at world size 2 before every scored run) is on by default; it would
# double the cost of every evaluation in this suite, so only tests/test_ranks.py turns it on.
os.environ.setdefault("PRISM_CONTRACT_WORLD_SIZES", "")
# Ray's dashboard costs a few CPU-seconds per cluster start; test_service's banner test starts one with it.
os.environ.setdefault("PRISM_CLUSTER_DASHBOARD", "false")

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"

BYTE_LENGTHS = np.ones(257, dtype=np.int64)
BYTE_LENGTHS[256] = 0


def write_bundle(directory: Path, architecture: str, training: str, prism_yaml: str | None = None,
                 extra: dict[str, str] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "architecture.py").write_text(textwrap.dedent(architecture))
    (directory / "training.py").write_text(textwrap.dedent(training))
    if prism_yaml is not None:
        (directory / "prism.yaml").write_text(textwrap.dedent(prism_yaml))
    for name, text in (extra or {}).items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(textwrap.dedent(text))
    return directory


def byte_stream(text: str) -> np.ndarray:
    """The `bytes` tokenizer's stream of one document: its UTF-8 bytes then end-of-text."""
    return np.append(np.frombuffer(text.encode(), dtype=np.uint8).astype(np.uint16), np.uint16(256))


def train_on_stream(bundle: Bundle, tokens: np.ndarray, run_dir: Path, byte_budget: int = 0,
                    time_limit: float = 120.0, seed: int = 1337, max_params: int = 150_000_000,
                    byte_lengths: np.ndarray = BYTE_LENGTHS, vocab_size: int = 257,
                    policy: SandboxPolicy | None = None, probe_every: int = 1, heldout=None, world_size: int = 1,
                    rank_timeout: float = 120.0, gpu_handoff: str = "host", hold=None) -> TrainOutcome:
    spec = RunSpec(
        bundle_dir=bundle.write_to(run_dir / "bundle"),
        exporter_bundle_dir=bundle.write_to(run_dir / "exporter-bundle", without_training=True),
        architecture=(bundle.config.architecture_entry.file, bundle.config.architecture_entry.symbol),
        training=(bundle.config.training_entry.file, bundle.config.training_entry.symbol),
        tokenizer=bundle.config.tokenizer, vocab_size=vocab_size, max_seq_len=1024, max_params=max_params,
        seed=seed, device="cpu", byte_budget=byte_budget, artifacts_dir=run_dir / "artifacts", data_dir="",
        threads=world_size, probe_every=probe_every, world_size=world_size, rank_timeout=rank_timeout,
        gpu_handoff=gpu_handoff,
    )
    return run_session(spec, tokens, byte_lengths, run_dir, time_limit, policy=policy, heldout=heldout, hold=hold)


@pytest.fixture
def bundle_factory(tmp_path):
    counter = iter(range(1000))

    def make(architecture: str, training: str, prism_yaml: str | None = "tokenizer: bytes\n",
             extra: dict[str, str] | None = None) -> Bundle:
        return load_bundle(write_bundle(tmp_path / f"bundle{next(counter)}", architecture, training, prism_yaml,
                                        extra))

    return make


def scored_report(bpb: float | None, final_score: float | None = None, curve: list[dict] | None = None,
                  **fields) -> RunReport:
    """A completed run's report with this bpb, final_score (1/(1+bpb) unless given) and curve: what the store
    reads a scores row and a curve off."""
    if final_score is None and bpb is not None:
        final_score = 1 / (1 + bpb)
    return RunReport(status="completed", stage="score", bpb=bpb, final_score=final_score, curve=curve or [],
                     **fields)
