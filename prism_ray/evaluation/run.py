"""The train stage's work: one sandboxed run of a bundle on the locked data, held-out passes included.

`train()` resolves the data, writes the bundle twice into the run dir (the trainer's copy, and the exporter's without
the training file), starts the multi-GPU contract check (harness/contract.py) beside the scored session
(harness/session.py: scorer, exporter, trainer) and turns the held-out pass results into the report's held-out
block. Plain Python: the CLI calls it in-process, the cluster in a num_gpus=N task (PRISM_GPUS_PER_RUN).
"""

from __future__ import annotations

import functools
import glob
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from prism_ray.config import EMBEDDED_DATA_DIR, Settings, contract_sizes
from prism_ray.data.dataset import LockedDataset, open_dataset
from prism_ray.data.token_cache import load_token_stream
from prism_ray.data.tokenizers import get_tokenizer
from prism_ray.errors import PrismError, Reason
from prism_ray.evaluation import scoring
from prism_ray.evaluation.report import DataInfo, HeldoutResult, TrainResult
from prism_ray.harness.contract import ContractRun, check_contract
from prism_ray.harness.isolation import SandboxPolicy
from prism_ray.harness.records import RETRYABLE_RULES, EvalPass, PassResult, Progress, RunSpec, TrainOutcome
from prism_ray.harness.session import run_session
from prism_ray.harness.stream import StreamPlan
from prism_ray.intake.bundle import Bundle


def new_run_dir(settings: Settings, bundle: Bundle) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = settings.cache_dir / "runs" / f"{stamp}-{bundle.sha256[:10]}-{uuid.uuid4().hex[:6]}"
    run_dir.mkdir(parents=True, exist_ok=False)
    return run_dir


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


def run_spec(bundle: Bundle, settings: Settings, run_dir: Path, tokenizer: str, vocab_size: int,
             data_dir: str) -> RunSpec:
    entry_a, entry_t = bundle.config.architecture_entry, bundle.config.training_entry
    return RunSpec(
        bundle_dir=bundle.write_to(run_dir / "bundle"),
        exporter_bundle_dir=bundle.write_to(run_dir / "exporter-bundle", without_training=True),
        architecture=(entry_a.file, entry_a.symbol), training=(entry_t.file, entry_t.symbol), tokenizer=tokenizer,
        vocab_size=vocab_size, max_seq_len=settings.max_seq_len, max_params=settings.max_params, seed=settings.seed,
        device=settings.device, byte_budget=settings.byte_budget, artifacts_dir=run_dir / "artifacts",
        data_dir=data_dir, threads=settings.runner_threads or len(os.sched_getaffinity(0)),
        probe_every=settings.causality_probe_every, world_size=settings.gpus_per_run,
        rank_timeout=settings.rank_timeout, gpu_handoff=settings.gpu_handoff,
    )


def train(bundle: Bundle, settings: Settings, run_dir: Path,
          progress: Callable[[Progress], None] | None = None) -> TrainResult:
    """Run the miner's loop on the locked train split, then the held-out passes; data problems come back as a
    failed outcome."""
    tokenizer = get_tokenizer(bundle.config.tokenizer)
    not_run = HeldoutResult(status="not_run", message="held-out: not run (the training run did not complete)")
    result = TrainResult(outcome=TrainOutcome(), data=None, heldout=not_run, tokenizer=tokenizer.name,
                         vocab_size=tokenizer.vocab_size, seed=settings.seed, byte_budget=settings.byte_budget,
                         run_dir=str(run_dir))
    try:
        dataset = open_dataset(settings.data_dir)
        stream = load_token_stream(dataset, "train", tokenizer.name, settings.cache_dir, settings.encode_threads)
    except PrismError as error:
        result.outcome.reasons = error.reasons
        return result
    result.data = DataInfo(path=str(dataset.root), fingerprint=dataset.fingerprint, pinned=dataset.pinned,
                           documents=stream.documents, tokens=int(len(stream.tokens)))
    heldout = _HeldoutPlan(dataset, stream.tokens, settings, tokenizer.name)
    spec = run_spec(bundle, settings, run_dir, tokenizer.name, tokenizer.vocab_size, str(dataset.root))
    contract = None
    if contract_sizes(settings):
        contract = ContractRun(functools.partial(
            check_contract, spec, contract_sizes(settings), settings.contract_batches, stream.byte_lengths, run_dir,
            settings.contract_time_limit, sandbox_policy(settings)), reject=settings.contract_policy == "reject")
    # the scored session's sandboxes start beside the checks; its miner code waits for them (contract.wait), under
    # either policy: the checks' miner code must not watch the scored run (docs/rules.md)
    result.outcome = run_session(spec, stream.tokens, stream.byte_lengths, run_dir, settings.time_limit, progress,
                                 sandbox_policy(settings), heldout=heldout.passes,
                                 heldout_time_limit=settings.heldout_time_limit,
                                 hold=contract.wait if contract else None)
    if contract is not None:
        result.contract = contract.join()
        ending = contract.wait()
        if ending is not None:  # rejected before the scored run began, or retried as a system failure
            retry = ending[0].rule in RETRYABLE_RULES
            result.outcome = TrainOutcome(reasons=ending, before_data=not retry)
            return result
    if result.outcome.status == "completed":
        result.heldout = heldout.result(result.outcome)
        if result.heldout.status == "failed":  # never "scored on bpb alone" when the dataset has a val split
            result.outcome.status = "failed"
            result.outcome.reasons = list(result.heldout.reasons)
    return result


HELDOUT_DIGITS = 4  # decimals of the held-out bpb a report shows


class _HeldoutPlan:
    """Which held-out passes a completed run gets, and what their results mean. Never silent: the status says
    why a pass did not run (a dataset without a usable val split: the score rests on bpb alone), and a pass that
    failed fails the run."""

    def __init__(self, dataset: LockedDataset, train_tokens: np.ndarray, settings: Settings, tokenizer: str):
        self.dataset, self.train_tokens, self.settings, self.tokenizer = dataset, train_tokens, settings, tokenizer
        self.skipped: HeldoutResult | None = None

    def passes(self, outcome: TrainOutcome) -> list[EvalPass]:
        if not self.dataset.has_split("val"):
            self.skipped = HeldoutResult(status="no_val_split", message="held-out: no val split in this dataset; "
                                         "scored on bpb alone")
            return []
        try:
            val = load_token_stream(self.dataset, "val", self.tokenizer, self.settings.cache_dir)
        except PrismError as error:
            self.skipped = HeldoutResult(status="failed", reasons=error.reasons, message=f"held-out: failed "
                                         f"({error.rule}); the run is not scored")
            return []
        batch_size, seq_len = outcome.batch_size, outcome.seq_len
        if not StreamPlan(val.tokens, val.byte_lengths, batch_size, seq_len, 0).available_batches:
            self.skipped = HeldoutResult(status="val_too_small", message=f"held-out: the val split's "
                                         f"{len(val.tokens)} tokens are fewer than one {batch_size}×{seq_len} batch "
                                         "needs; scored on bpb alone")
            return []
        budget = self.settings.scoring.heldout_byte_budget
        if self.settings.byte_budget:  # a pass never scores more text than the run itself did
            budget = min(budget, self.settings.byte_budget)
        slice_budget = min(budget, sum(outcome.batch_bytes))
        return [EvalPass("val_twin", val.tokens, budget, trained=False),
                EvalPass("val_trained", val.tokens, budget, trained=True),
                EvalPass("train_slice", self.train_tokens, slice_budget, trained=True),
                EvalPass("twin_step0", self.train_tokens, 0, trained=False, max_batches=1)]

    def result(self, outcome: TrainOutcome) -> HeldoutResult:
        if self.skipped is not None:
            return self.skipped.model_copy(update={"seconds": outcome.heldout_seconds})
        if outcome.heldout_reasons or outcome.heldout is None:
            reasons = outcome.heldout_reasons
            if not reasons:
                reasons = [Reason(rule="run:heldout_failed", message="the held-out passes gave no result")]
            return HeldoutResult(status="failed", reasons=reasons, seconds=outcome.heldout_seconds,
                                 message=f"held-out: failed ({reasons[0].rule}); the run is not scored")
        passed: dict[str, PassResult] = outcome.heldout
        # Rounded: a forward can make a held-out loss encode the secret text it saw (causally too), so these numbers
        # carry at most ~17 bits each (docs/rules.md, "What a determined attacker still has to defeat").
        bpb = {name: round(scoring.bits_per_byte(p.nats, p.bytes), HELDOUT_DIGITS) for name, p in passed.items()}
        delta = round(bpb["val_twin"] - bpb["val_trained"], HELDOUT_DIGITS)
        gap = round(bpb["val_trained"] - bpb["train_slice"], HELDOUT_DIGITS)
        twin = passed["twin_step0"]
        return HeldoutResult(
            status="completed", val_bpb_trained=bpb["val_trained"], val_bpb_twin=bpb["val_twin"],
            heldout_delta=delta, train_slice_bpb=bpb["train_slice"], gap=gap,
            twin_step0_loss=twin.nats / twin.targets if twin.targets else None, val_bytes=passed["val_trained"].bytes,
            train_slice_bytes=passed["train_slice"].bytes, seconds=outcome.heldout_seconds,
            message=f"held-out: val bpb {bpb['val_trained']:.4f} vs. step-0 twin {bpb['val_twin']:.4f} "
                    f"(delta {delta:+.4f}), gap {gap:+.4f}")
