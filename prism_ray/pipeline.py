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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from prism_ray import gate, policy, scoring
from prism_ray.bundle import Bundle, load_bundle
from prism_ray.config import EMBEDDED_DATA_DIR, IntakeLimits, Settings
from prism_ray.data.dataset import open_dataset
from prism_ray.data.token_cache import load_token_stream
from prism_ray.data.tokenizers import get_tokenizer
from prism_ray.errors import BundleError, PrismError, Reason
from prism_ray.harness.isolation import SandboxPolicy
from prism_ray.harness.session import EvalPass, Progress, RunSpec, TrainOutcome, run_heldout, run_training
from prism_ray.harness.stream import StreamPlan
from prism_ray.report import DataInfo, HeldoutResult, RunReport


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
    return policy.inspect(bundle)


def probe(bundle: Bundle, settings: Settings, run_dir: Path) -> list[Reason]:
    """Instantiate the architecture in the sandbox under the forced seed: parameter cap and a causality check
    on random tokens, before any data or GPU time is spent."""
    tokenizer = get_tokenizer(bundle.config.tokenizer)
    spec = _run_spec(bundle, settings, run_dir / "probe", tokenizer.name, tokenizer.vocab_size, data_dir="",
                     mode="probe")
    outcome = run_training(spec, np.zeros(0, dtype=np.uint16), tokenizer.token_byte_lengths(), run_dir / "probe",
                           settings.probe_time_limit, policy=sandbox_policy(settings))
    return outcome.reasons


def _run_spec(bundle: Bundle, settings: Settings, run_dir: Path, tokenizer: str, vocab_size: int, data_dir: str,
              mode: str = "train", state_path: str = "") -> RunSpec:
    entry_a, entry_t = bundle.config.architecture_entry, bundle.config.training_entry
    return RunSpec(
        bundle_dir=bundle.write_to(run_dir / "bundle"), architecture=(entry_a.file, entry_a.symbol),
        training=(entry_t.file, entry_t.symbol), tokenizer=tokenizer, vocab_size=vocab_size,
        max_seq_len=settings.max_seq_len, max_params=settings.max_params, seed=settings.seed, device=settings.device,
        byte_budget=settings.byte_budget, artifacts_dir=run_dir / "artifacts", data_dir=data_dir,
        threads=settings.runner_threads or len(os.sched_getaffinity(0)), causality_probes=settings.causality_probes,
        mode=mode, state_path=state_path,
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


def heldout(bundle: Bundle, result: TrainResult, settings: Settings) -> HeldoutResult:
    """Sandboxed held-out evaluation: trained model vs. its true step-0 twin on the secret val split, and the
    trained model on an equal slice of the train bytes it learned from. Never silent: the status says why."""
    started = time.monotonic()
    outcome = result.outcome
    if outcome.status != "completed" or outcome.state_path is None:
        return HeldoutResult(status="not_run", message="held-out: not run (the training run did not complete)")
    try:
        dataset = open_dataset(settings.data_dir)
        if not dataset.has_split("val"):
            return HeldoutResult(status="no_val_split", message="held-out: no val split in this dataset; scored on "
                                 "bpb alone")
        train_stream = load_token_stream(dataset, "train", result.tokenizer, settings.cache_dir)
        val_stream = load_token_stream(dataset, "val", result.tokenizer, settings.cache_dir)
    except PrismError as error:
        return HeldoutResult(status="failed", reasons=error.reasons, message=f"held-out: failed ({error.rule}); "
                             "scored on bpb alone")
    if not StreamPlan(val_stream.tokens, val_stream.byte_lengths, outcome.batch_size, outcome.seq_len,
                      0).available_batches:
        return HeldoutResult(status="val_too_small", message=f"held-out: the val split's {len(val_stream.tokens)} "
                             f"tokens are fewer than one {outcome.batch_size}×{outcome.seq_len} batch needs; scored "
                             "on bpb alone")
    budget = settings.scoring.heldout_byte_budget
    slice_budget = min(budget, sum(outcome.batch_bytes))
    passes = [EvalPass("val_twin", val_stream.tokens, budget, trained=False),
              EvalPass("val_trained", val_stream.tokens, budget, trained=True),
              EvalPass("train_slice", train_stream.tokens, slice_budget, trained=True),
              EvalPass("twin_step0", train_stream.tokens, 0, trained=False, max_batches=1)]
    run_dir = Path(result.run_dir) / "heldout"
    state_dir = Path(outcome.state_path).parent
    spec = _run_spec(bundle, settings, run_dir, result.tokenizer, result.vocab_size, data_dir="", mode="heldout",
                     state_path=outcome.state_path)
    policy = replace(sandbox_policy(settings), readable=(state_dir,))
    status, passed = run_heldout(spec, passes, train_stream.byte_lengths, outcome.batch_size, outcome.seq_len,
                                 run_dir, settings.heldout_time_limit, policy)
    seconds = time.monotonic() - started
    if status.reasons:
        return HeldoutResult(status="failed", reasons=status.reasons, seconds=seconds,
                             message=f"held-out: failed ({status.reasons[0].rule}); scored on bpb alone")
    bpb = {name: scoring.bits_per_byte(p.nats, p.bytes) for name, p in passed.items()}
    delta = bpb["val_twin"] - bpb["val_trained"]
    gap = bpb["val_trained"] - bpb["train_slice"]
    twin = passed["twin_step0"]
    return HeldoutResult(
        status="completed", val_bpb_trained=bpb["val_trained"], val_bpb_twin=bpb["val_twin"], heldout_delta=delta,
        train_slice_bpb=bpb["train_slice"], gap=gap, twin_step0_loss=twin.nats / twin.targets if twin.targets else None,
        val_bytes=passed["val_trained"].bytes, train_slice_bytes=passed["train_slice"].bytes, seconds=seconds,
        message=f"held-out: val bpb {bpb['val_trained']:.4f} vs. step-0 twin {bpb['val_twin']:.4f} "
                f"(delta {delta:+.4f}), gap {gap:+.4f}")


def score(bundle: Bundle, result: TrainResult, settings: Settings, wall_seconds: float,
          held: HeldoutResult | None = None) -> RunReport:
    outcome = result.outcome
    nats, targets, target_bytes = sum(outcome.batch_nats), sum(outcome.batch_targets), sum(outcome.batch_bytes)
    bpb = scoring.bits_per_byte(nats, target_bytes)
    step0_loss = outcome.batch_nats[0] / outcome.batch_targets[0] if outcome.batches else None
    reasons = list(outcome.reasons)
    breakdown = None
    if not reasons:
        try:
            completed = held is not None and held.status == "completed"
            inputs = scoring.ScoreInputs(bpb=bpb, vocab_size=result.vocab_size, step0_loss=step0_loss,
                                         heldout_delta=held.heldout_delta if completed else None,
                                         gap=held.gap if completed else None)
            breakdown = scoring.final_score(inputs, settings.scoring)
        except PrismError as error:
            reasons.extend(error.reasons)
    scored = breakdown is not None
    return RunReport(
        status="completed" if scored else "failed",
        stage="score" if scored else ("data" if result.data is None else "train"), reasons=reasons,
        bundle_sha256=bundle.sha256, name=bundle.display_name,
        bpb=bpb if scored else None, final_score=breakdown.final_score if breakdown else None,
        score=breakdown.model_dump(exclude={"inputs"}) if breakdown else None,
        heldout=held.model_dump() if held else None,
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
    held = heldout(bundle, result, settings)
    report = score(bundle, result, settings, time.monotonic() - started, held)
    report.gate = verdict.to_report()
    (run_dir / "report.json").write_text(report.model_dump_json(indent=2))
    return report
