"""evaluate(bundle) = intake → check → gate → train → score, as plain functions (no Ray).

The cluster runs the same stage functions as Ray tasks, so `prism-ray eval` and the cluster give the
same score by construction.
"""

from __future__ import annotations

import glob
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prism_ray import gate, sandbox, scoring
from prism_ray.bundle import Bundle, load_bundle
from prism_ray.config import EMBEDDED_DATA_DIR, IntakeLimits, Settings
from prism_ray.data.dataset import open_dataset
from prism_ray.data.token_cache import load_token_stream
from prism_ray.data.tokenizers import get_tokenizer
from prism_ray.errors import BundleError, PrismError, Reason
from prism_ray.harness.isolation import SandboxPolicy
from prism_ray.harness.session import Progress, RunSpec, TrainOutcome, run_training
from prism_ray.report import DataInfo, RunReport


@dataclass
class TrainResult:
    """What the train stage hands to the score stage (picklable: it travels through Ray's object store)."""

    outcome: TrainOutcome
    data: DataInfo | None
    tokenizer: str
    vocab_size: int
    seed: int
    byte_budget: int
    run_dir: str


def new_run_dir(settings: Settings, bundle: Bundle) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = settings.cache_dir / "runs" / f"{stamp}-{bundle.sha256[:10]}-{uuid.uuid4().hex[:6]}"
    run_dir.mkdir(parents=True, exist_ok=False)
    return run_dir


def intake(source: Path | str | bytes, limits: IntakeLimits | None = None) -> Bundle:
    return load_bundle(source, limits)


def check(bundle: Bundle) -> list[Reason]:
    """Static checks before any code runs: the sandbox's AST policy over every .py file."""
    return sandbox.inspect(bundle)


def probe(bundle: Bundle, settings: Settings, run_dir: Path) -> list[Reason]:
    """Instantiate the architecture in the sandbox under the forced seed: parameter cap and a causality check
    on random tokens, before any data or GPU time is spent."""
    tokenizer = get_tokenizer(bundle.config.tokenizer)
    spec = _run_spec(bundle, settings, run_dir / "probe", tokenizer.name, tokenizer.vocab_size, data_dir="",
                     probe_only=True)
    outcome = run_training(spec, np.zeros(0, dtype=np.uint16), tokenizer.token_byte_lengths(), run_dir / "probe",
                           settings.probe_time_limit, policy=sandbox_policy(settings))
    return outcome.reasons


def _run_spec(bundle: Bundle, settings: Settings, run_dir: Path, tokenizer: str, vocab_size: int, data_dir: str,
              probe_only: bool = False) -> RunSpec:
    entry_a, entry_t = bundle.config.architecture_entry, bundle.config.training_entry
    return RunSpec(
        bundle_dir=bundle.write_to(run_dir / "bundle"), architecture=(entry_a.file, entry_a.symbol),
        training=(entry_t.file, entry_t.symbol), tokenizer=tokenizer, vocab_size=vocab_size,
        max_seq_len=settings.max_seq_len, max_params=settings.max_params, seed=settings.seed, device=settings.device,
        byte_budget=settings.byte_budget, artifacts_dir=run_dir / "artifacts", data_dir=data_dir,
        threads=settings.runner_threads or len(os.sched_getaffinity(0)), causality_probes=settings.causality_probes,
        probe_only=probe_only,
    )


def review(bundle: Bundle, settings: Settings, cache: gate.VerdictCache | None = None) -> gate.GateResult:
    return gate.review(bundle, settings.gate, cache if cache is not None else
                       gate.FileVerdictCache(settings.cache_dir / "gate-verdicts"))


def sandbox_policy(settings: Settings) -> SandboxPolicy:
    gpu = settings.device != "cpu" and bool(glob.glob("/dev/nvidia[0-9]*"))
    limits = settings.sandbox
    hidden = [settings.data_dir, EMBEDDED_DATA_DIR, settings.cache_dir, *limits.hide]
    if settings.gate.api_key_file:
        hidden.append(settings.gate.api_key_file)
    return SandboxPolicy(mode=limits.mode, hidden=tuple(Path(p) for p in hidden),
                         artifacts_quota_bytes=limits.artifacts_quota_bytes, tmp_quota_bytes=limits.tmp_quota_bytes,
                         address_space_bytes=None if gpu else limits.memory_bytes,
                         file_size_bytes=limits.file_size_bytes, max_processes=limits.max_processes, gpu=gpu)


def train(bundle: Bundle, settings: Settings, run_dir: Path,
          progress: Callable[[Progress], None] | None = None) -> TrainResult:
    """Run the miner's loop on the locked train split; data problems come back as a failed outcome."""
    tokenizer = get_tokenizer(bundle.config.tokenizer)
    result = TrainResult(outcome=TrainOutcome(), data=None, tokenizer=tokenizer.name, vocab_size=tokenizer.vocab_size,
                         seed=settings.seed, byte_budget=settings.byte_budget, run_dir=str(run_dir))
    try:
        dataset = open_dataset(settings.data_dir)
        stream = load_token_stream(dataset, "train", tokenizer.name, settings.cache_dir, settings.encode_threads)
    except PrismError as error:
        result.outcome.reasons = error.reasons
        return result
    result.data = DataInfo(path=str(dataset.root), fingerprint=dataset.fingerprint, pinned=dataset.pinned,
                           documents=stream.documents, tokens=int(len(stream.tokens)))
    spec = _run_spec(bundle, settings, run_dir, tokenizer.name, tokenizer.vocab_size, str(dataset.root))
    result.outcome = run_training(spec, stream.tokens, stream.byte_lengths, run_dir, settings.time_limit, progress,
                                  sandbox_policy(settings))
    return result


def score(bundle: Bundle, result: TrainResult, settings: Settings, wall_seconds: float) -> RunReport:
    outcome = result.outcome
    nats, targets, target_bytes = sum(outcome.batch_nats), sum(outcome.batch_targets), sum(outcome.batch_bytes)
    bpb = scoring.bits_per_byte(nats, target_bytes)
    step0_loss = outcome.batch_nats[0] / outcome.batch_targets[0] if outcome.batches else None
    reasons = list(outcome.reasons)
    breakdown = None
    if not reasons:
        try:
            breakdown = scoring.final_score(scoring.ScoreInputs(bpb=bpb, vocab_size=result.vocab_size,
                                                                step0_loss=step0_loss), settings.scoring)
        except PrismError as error:
            reasons.extend(error.reasons)
    scored = breakdown is not None
    return RunReport(
        status="completed" if scored else "failed",
        stage="score" if scored else ("data" if result.data is None else "train"), reasons=reasons,
        bundle_sha256=bundle.sha256, name=bundle.display_name,
        bpb=bpb if scored else None, final_score=breakdown.final_score if breakdown else None,
        score=breakdown.model_dump(exclude={"inputs"}) if breakdown else None,
        tokens_scored=targets, bytes_scored=target_bytes, batches=outcome.batches,
        batch_size=outcome.batch_size, seq_len=outcome.seq_len, with_logits=outcome.with_logits,
        stopped_reason=outcome.stopped_reason, byte_budget=result.byte_budget, tokenizer=result.tokenizer,
        vocab_size=result.vocab_size, model_params=outcome.model_params, seed=result.seed, device=outcome.device,
        step0_loss=step0_loss, non_finite_batches=outcome.non_finite_batches, data=result.data,
        isolation="bubblewrap" if outcome.sandboxed else "none", wall_seconds=wall_seconds,
        train_seconds=outcome.stream_seconds,
        tokens_per_second=targets / outcome.stream_seconds if outcome.stream_seconds > 0 else None,
        run_dir=result.run_dir,
        curve=scoring.learning_curve(outcome.batch_nats, outcome.batch_bytes, settings.curve_points),
    )


def evaluate(source: Path | str | bytes | Bundle, settings: Settings | None = None,
             progress: Callable[[Progress], None] | None = None, run_dir: Path | None = None,
             verdicts: gate.VerdictCache | None = None) -> RunReport:
    settings = settings or Settings()
    started = time.monotonic()

    def stopped(status: str, stage: str, reasons: list[Reason], **fields) -> RunReport:
        return RunReport(status=status, stage=stage, reasons=reasons, wall_seconds=time.monotonic() - started,
                         **fields)

    try:
        bundle = source if isinstance(source, Bundle) else intake(source, settings.intake)
    except BundleError as error:
        return stopped("rejected", "intake", error.reasons)
    identity = {"bundle_sha256": bundle.sha256, "name": bundle.display_name, "tokenizer": bundle.config.tokenizer}
    findings = check(bundle)
    if findings:
        return stopped("rejected", "check", findings, **identity)
    run_dir = run_dir or new_run_dir(settings, bundle)
    findings = probe(bundle, settings, run_dir)
    if findings:
        return stopped("rejected", "check", findings, run_dir=str(run_dir), **identity)
    verdict = review(bundle, settings, verdicts)
    if verdict.status in ("rejected", "held"):
        return stopped(verdict.status, "gate", verdict.reasons, gate=verdict.to_report(), run_dir=str(run_dir),
                       **identity)
    result = train(bundle, settings, run_dir, progress)
    report = score(bundle, result, settings, time.monotonic() - started)
    report.gate = verdict.to_report()
    (run_dir / "report.json").write_text(report.model_dump_json(indent=2))
    return report
