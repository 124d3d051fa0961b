"""The multi-GPU contract check: a short, unscored run of the submission's own training at world size N (gloo on
CPU, its first few batches) before the scored run. The PRISM contract asks train(ctx) to be correct at any world
size; this is where that is exercised. Whether a failure rejects the bundle (`contract:multi_gpu`) or only shows in
the report is the operator's choice (docs/operator.md, docs/miner.md "Several GPUs").
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from prism_ray.errors import Reason
from prism_ray.harness.isolation import SandboxPolicy
from prism_ray.harness.records import RunSpec
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


def check_contract(spec: RunSpec, sizes: list[int], batches: int, tokens: np.ndarray, byte_lengths: np.ndarray,
                   run_dir: Path, time_limit: float, policy: SandboxPolicy) -> list[ContractCheck]:
    """One short run per world size, on CPU with gloo, the whole stream unscored (nothing of it is kept). Its ctx
    shows the scored run's byte budget, so a loop cannot tell the check by it (only by the device, on GPU nodes)."""
    checks = []
    for size in sizes:
        where = run_dir / f"contract-{size}"
        where.mkdir(parents=True, exist_ok=True)
        trial = replace(spec, world_size=size, max_batches=batches, device="cpu", probe_every=0,
                        artifacts_dir=where / "artifacts")
        outcome = run_session(trial, tokens, byte_lengths, where, time_limit, policy=replace(policy, gpu=False))
        passed = outcome.status == "completed"
        checks.append(ContractCheck(world_size=size, passed=passed, batches=outcome.batches,
                                    seconds=round(outcome.wall_seconds, 3),
                                    reasons=[] if passed else outcome.reasons[:3]))
    return checks


def rejection(checks: list[ContractCheck]) -> Reason | None:
    """The reason a bundle is rejected under the `reject` policy, if a check failed."""
    failed = [check for check in checks if not check.passed]
    if not failed:
        return None
    return Reason(rule="contract:multi_gpu", message="the training loop is not correct at several ranks ("
                  + "; ".join(check.summary() for check in failed) + "): this cluster rejects such bundles. "
                  "Run `prism-ray eval --contract` to see it, and docs/miner.md \"Several GPUs\" for a loop that "
                  "works at any world size")
