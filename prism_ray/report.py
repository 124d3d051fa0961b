"""The run report: what `prism-ray eval --json` prints, `report.json` holds and the store keeps."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from prism_ray.errors import Reason

Status = Literal["completed", "rejected", "failed", "held"]


class DataInfo(BaseModel):
    path: str
    fingerprint: str
    pinned: bool
    split: str = "train"
    documents: int | None = None
    tokens: int | None = None


class RunReport(BaseModel):
    status: Status
    stage: str
    reasons: list[Reason] = Field(default_factory=list)
    bundle_sha256: str | None = None
    name: str | None = None
    bpb: float | None = None
    final_score: float | None = None
    tokens_scored: int = 0
    bytes_scored: int = 0
    batches: int = 0
    batch_size: int | None = None
    seq_len: int | None = None
    with_logits: bool | None = None
    stopped_reason: str | None = None
    byte_budget: int | None = None
    tokenizer: str | None = None
    vocab_size: int | None = None
    model_params: int | None = None
    seed: int | None = None
    device: str | None = None
    step0_loss: float | None = None
    non_finite_batches: int = 0
    data: DataInfo | None = None
    gate: dict[str, Any] | None = None
    isolation: str | None = None
    score: dict[str, Any] | None = None
    heldout: dict[str, Any] | None = None
    wall_seconds: float = 0.0
    train_seconds: float = 0.0
    tokens_per_second: float | None = None
    run_dir: str | None = None
    curve: list[dict[str, float]] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "completed"


class HeldoutResult(BaseModel):
    """The held-out block (DESIGN §4): val bpb of the trained model and its true step-0 twin, and the gap."""

    status: Literal["completed", "failed", "no_val_split", "val_too_small", "not_run"]
    reasons: list[Reason] = Field(default_factory=list)
    val_bpb_trained: float | None = None
    val_bpb_twin: float | None = None
    heldout_delta: float | None = None
    train_slice_bpb: float | None = None
    gap: float | None = None
    twin_step0_loss: float | None = None
    val_bytes: int = 0
    train_slice_bytes: int = 0
    seconds: float = 0.0
    message: str = ""
