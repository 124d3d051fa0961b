"""The multi-GPU contract check: a short, unscored run of the submission's own training at world size N (gloo on
CPU, a few batches of random tokens) while the scored run's sandboxes start. The PRISM contract asks train(ctx) to
be correct at any world size; this is where that is exercised. It scores nothing (RunSpec.scored): the exporter
only builds the architecture, to hold the ranks' model to it, and exports nothing; the scorer hands out the batches
and compares the ranks. Whether a failure rejects the bundle
(`contract:multi_gpu`) or only shows in the report is the operator's choice (docs/operator.md, docs/miner.md
"Several GPUs").
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from prism_ray.errors import Reason
from prism_ray.harness.isolation import SandboxPolicy
from prism_ray.harness.records import RETRYABLE_RULES, RunSpec
from prism_ray.harness.session import run_session


class ContractCheck(BaseModel):
    world_size: int
    passed: bool
    batches: int = Field(description="batches the ranks trained on before the check ended")
    seconds: float = 0.0
    reasons: list[Reason] = Field(default_factory=list)

    def summary(self) -> str:
        if self.passed:
            return f"world size {self.world_size}: passed ({self.batches} batches, ranks agreed)"
        first = self.reasons[0] if self.reasons else None
        return f"world size {self.world_size}: failed" + (f" {first.rule}: {first.message}" if first else "")


_CHECK_TOKENS = 1 << 22  # the random stream's length: a few batches of any geometry a run can ask for


def check_contract(spec: RunSpec, sizes: list[int], batches: int, byte_lengths: np.ndarray, run_dir: Path,
                   time_limit: float, policy: SandboxPolicy) -> list[ContractCheck]:
    """One short unscored run per world size, on CPU with gloo, on tokens drawn at random from the vocabulary, never
    the locked text: the page cache and other kernel state outlive a sandbox, so what the check's ranks saw could
    reach the scored run (a red team passed a batch that way). Its ctx shows the scored run's byte budget."""
    tokens = random_stream(spec.vocab_size, spec.seed)
    checks = []
    for size in sizes:
        where = run_dir / f"contract-{size}"
        where.mkdir(parents=True, exist_ok=True)
        trial = replace(spec, world_size=size, max_batches=batches, device="cpu", probe_every=0,
                        artifacts_dir=where / "artifacts", scored=False)
        outcome = run_session(trial, tokens, byte_lengths, where, time_limit, policy=replace(policy, gpu=False))
        passed = outcome.status == "completed"
        checks.append(ContractCheck(world_size=size, passed=passed, batches=outcome.batches,
                                    seconds=round(outcome.wall_seconds, 3),
                                    reasons=[] if passed else outcome.reasons[:3]))
    return checks


def random_stream(vocab_size: int, seed: int) -> np.ndarray:
    generator = np.random.default_rng([seed, 0x5EED])
    return generator.integers(0, vocab_size, _CHECK_TOKENS, dtype=np.uint32).astype(
        np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class ContractRun:
    """The checks in a thread of their own, started with the scored session: that session's sandboxes start
    meanwhile (interpreters, imports, the scorer's device), but none of them runs miner code before the checks have
    ended (`wait`): a bundle they reject never runs on the stream, and the two never run miner code at once
    (docs/rules.md, "Pass the stream from the check to the scored run")."""

    def __init__(self, check: Callable[[], list[ContractCheck]], reject: bool):
        self.reject = reject  # the operator's policy: a failed check rejects the bundle, or only shows
        self._checks: list[ContractCheck] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(check,), name="prism-contract", daemon=True)
        self._thread.start()

    def _run(self, check: Callable[[], list[ContractCheck]]) -> None:
        try:
            self._checks = check()
        except BaseException as error:  # noqa: BLE001 — raised again in the caller's thread by join()
            self._error = error

    def join(self) -> list[ContractCheck]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._checks

    def wait(self) -> list[Reason] | None:
        """Once the checks have ended: why they end the submission, if they do — a system failure, which is
        retried, or a failed check under the reject policy."""
        checks = self.join()
        retry = [reason for check in checks for reason in check.reasons if reason.rule in RETRYABLE_RULES]
        rejected = rejection(checks) if self.reject else None
        return retry or ([rejected] if rejected is not None else None)


def rejection(checks: list[ContractCheck]) -> Reason | None:
    """The reason a bundle is rejected under the `reject` policy, if a check failed."""
    failed = [check for check in checks if not check.passed]
    if not failed:
        return None
    return Reason(rule="contract:multi_gpu", message="the training loop is not correct at several ranks ("
                  + "; ".join(check.summary() for check in failed) + "): this cluster rejects such bundles. "
                  "Run `prism-ray eval --contract` to see it, and docs/miner.md \"Several GPUs\" for a loop that "
                  "works at any world size")
