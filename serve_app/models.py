"""The HTTP API's settings and its pydantic request/response models (docs/api.md shows each with an example)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    computed_field,
    field_validator,
)

from prism_ray.errors import Reason
from prism_ray.evaluation.scoring import CurvePoint, ScoreFields
from serve_app.wire import PrismStatus

MAX_METADATA_BYTES = 16_384


# --- requests -----------------------------------------------------------------------------------------------------

class SubmissionRequest(BaseModel):
    """A JSON submission (PRISM's format): the bundle as a base64 zip."""

    model_config = ConfigDict(extra="ignore")  # PRISM clients may send fields this server does not use

    filename: str = Field(default="bundle.zip", min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f]+$",
                          examples=["model.zip"])
    code: str = Field(min_length=1, description="the bundle zip, base64", examples=["UEsDBBQAAAAIAAAAIQ..."])
    metadata: dict[str, Any] | None = Field(default=None, description=f"free-form, ≤ {MAX_METADATA_BYTES} bytes "
                                            "as JSON", examples=[{"notes": "rope + swiglu"}])

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, metadata: dict[str, Any] | None) -> dict[str, Any] | None:
        if metadata is not None and len(json.dumps(metadata)) > MAX_METADATA_BYTES:
            raise ValueError(f"metadata is over {MAX_METADATA_BYTES} bytes as JSON")
        return metadata


# --- responses ----------------------------------------------------------------------------------------------------

class ErrorBody(BaseModel):
    """Every error: a stable code, a sentence, typed reasons; `id`/`status` when a rejection was stored."""

    error: str = Field(examples=["intake:rejected"])
    message: str
    reasons: list[Reason] = Field(default_factory=list)
    id: str | None = None
    status: str | None = None

    @computed_field(description="the message again, where PRISM's (FastAPI's) clients read it")  # type: ignore[prop-decorator]
    @property
    def detail(self) -> str:
        return self.message


STATUS_TEXT = "PRISM's six statuses; a duplicate is `rejected` (its `state` says `duplicate`)"
STATE_TEXT = "prism-ray's own status: PRISM's six, or `duplicate`"


class SubmissionAccepted(BaseModel):
    id: str
    status: PrismStatus = Field(description=STATUS_TEXT)
    state: Literal["pending", "running", "completed", "rejected", "failed", "held", "duplicate"] = Field(
        description=STATE_TEXT)
    stage: str
    hotkey: str
    epoch_id: int = Field(description="the scoring epoch of its submission time")
    code_hash: str = Field(description="sha256 of the uploaded zip; empty when no zip was kept (a stored rejection)")
    filename: str | None
    name: str | None
    created_at: datetime = Field(description="ISO 8601, UTC")
    created_at_unix: float = Field(description="the same time in Unix seconds")
    reused: bool = Field(description="true: this hotkey already submitted identical code; that submission is returned")
    duplicate_of: str | None = None
    reasons: list[Reason] = Field(default_factory=list)
    status_url: str


class Scores(ScoreFields):  # the scores row (the store's `scores` columns) and the held-out numbers beside it
    val_bpb_trained: float | None = None
    val_bpb_twin: float | None = None
    flags: list[str] = Field(default_factory=list)


class Progress(BaseModel):
    bytes_scored: int | None = None
    byte_budget: int | None = None
    running_bpb: float | None = None
    tokens_per_second: float | None = None
    updated_at: float | None = None
    node: str | None = Field(default=None, description="the Ray node id the run ran on")
    node_address: str | None = Field(default=None, description="that node's address (hostname and IP)")


class Event(BaseModel):
    seq: int
    at: float
    kind: str
    stage: str | None
    detail: dict[str, Any]


class SubmissionStatus(BaseModel):
    id: str
    hotkey: str
    filename: str | None
    name: str | None
    tokenizer: str | None
    status: PrismStatus = Field(description=STATUS_TEXT)
    state: Literal["pending", "running", "completed", "rejected", "failed", "held", "duplicate"] = Field(
        description=STATE_TEXT)
    stage: str
    epoch_id: int = Field(description="the scoring epoch of its submission time")
    code_hash: str = Field(description="sha256 of the uploaded zip; empty when no zip was kept (a stored rejection)")
    final_score: float | None = Field(default=None, description="scores.final_score, once completed")
    penalty: float | None = Field(default=None, description="scores.penalty, once completed")
    error: str | None = Field(default=None, description="why it was not scored: the reasons in one line (failed, "
                              "rejected, held, duplicate)")
    reasons: list[Reason]
    attempt: int
    max_attempts: int
    created_at: datetime = Field(description="ISO 8601, UTC")
    created_at_unix: float = Field(description="the same time in Unix seconds")
    updated_at: float
    finished_at: float | None
    duplicate_of: str | None
    architecture_family: str | None = None
    copy_of: str | None = Field(default=None, description="copy:duplicate: another hotkey's earlier submission of the "
                                "same code (up to names, layout, comments) or with the same first per-batch losses "
                                "(the same learner); this one earns no weight")
    near_copy_of: str | None = Field(default=None, description="copy:near: another hotkey's earlier submission that "
                                     "differs from this one only in numeric literals")
    notes: list[Reason] = Field(default_factory=list, description="typed notes kept whatever the status (copy:*)")
    scores: Scores | None = None
    progress: Progress | None = None
    events: list[Event]


class ComputeProfile(BaseModel):
    tokens_per_second: float | None = None
    wall_seconds: float | None = None
    train_seconds: float | None = None
    device: str | None = None
    node: str | None = Field(default=None, description="the Ray node id the run ran on")
    node_address: str | None = Field(default=None, description="that node's address (hostname and IP)")
    model_params: int | None = None
    tokens_scored: int | None = None
    bytes_scored: int | None = None
    batches: int | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    tokenizer: str | None = None


class LossCurveSeries(BaseModel):
    online_loss: list[float] = Field(description="the online loss of each stretch between two points, nats per byte")
    covered_bytes_cumulative: list[float]
    step0_loss: float | None = Field(description="the loss on the first batch, nats per token")
    baseline_nats: float | None = Field(description="ln(vocab size): a uniform guess's loss, nats per token")
    points: int
    downsampled: bool


class CurveBpb(BaseModel):
    prequential_bpb: float | None
    bits_per_byte: float | None


class CurveCompute(BaseModel):
    gpu_count: int | None
    device: str | None
    gpu_tier: str | None
    model_params: int | None
    tokens_consumed: int | None
    estimated_flops: float | None = Field(description="6 · model_params · tokens_consumed")
    wall_clock_seconds: float | None
    gpu_hours: float | None
    peak_vram_bytes: int | None
    peak_rss_bytes: int | None


class Curve(BaseModel):
    id: str
    status: str
    points: list[CurvePoint] = Field(description="cumulative target bytes vs. running bpb, at most 500 points")
    profile: ComputeProfile = Field(description="null fields: what the run never reached (e.g. a failed run)")
    submission_id: str = Field(description="PRISM's name for `id`")
    loss_curve: LossCurveSeries = Field(description="PRISM's curve (docs/api.md, PRISM compatibility)")
    bpb: CurveBpb
    compute: CurveCompute


class QueueEntry(BaseModel):
    id: str
    position: int = Field(description="1-based place in line: running submissions first, then the waiting ones")
    status: Literal["pending", "running"]
    stage: str
    name: str | None
    hotkey: str
    attempt: int = Field(description="claims so far; a submission is tried again only after a system failure")
    max_attempts: int
    created_at: float
    starts_in: float | None = Field(description="estimated seconds until it starts (0: running); null until a run "
                                    "has completed to estimate from")
    done_in: float | None = Field(description="estimated seconds until it finishes")
    progress: Progress | None = None


class Queue(BaseModel):
    running: int
    waiting: int
    typical_run_seconds: float | None = Field(description="median claim-to-finish seconds of the latest 20 "
                                              "completed runs: the basis of every ETA")
    notice: str | None = Field(default=None, description="why scored runs cannot start, e.g. no node has the "
                               "PRISM_GPUS_PER_RUN GPUs a run needs")
    entries: list[QueueEntry]


class LeaderboardRow(BaseModel):
    rank: int
    hotkey: str
    submission_id: str
    name: str | None
    bpb: float | None
    final_score: float | None
    heldout_delta: float | None
    architecture_family: str | None
    copy_of: str | None = Field(default=None, description="a copy of this earlier submission: ranked, earns no weight")
    near_copy_of: str | None = None
    audit: Literal["unaudited", "pending", "passed", "failed"] | None = Field(
        default=None, description="the score's re-execution audit; only `passed` earns weight (null: audits are off)")
    submitted_at: float
    score: float = Field(description="PRISM's name for final_score")
    tied_with: int | None = Field(default=None, description="rank of the first entry of its decided group when that "
                                  "is another one: no decided difference separates them (docs/scoring.md)")
    replicas: Literal["none", "pending", "done"] | None = Field(default=None, description="its seed replicas "
                                                                "(null: replicas are off)")
    seeds: int = Field(default=1, description="runs with a bpb: the scored run and its completed replicas")
    mean_bpb: float | None = Field(default=None, description="mean bpb over its seeds")
    spread_bpb: float | None = Field(default=None, description="standard deviation of bpb over its seeds")
    gpu_seconds: float | None = Field(default=None, description="training seconds of all its runs")
    tokens_per_second: float | None = None
    est_flops: float | None = Field(default=None, description="estimated training FLOPs: 6 · parameters · tokens")
    penalty: float | None = Field(default=None, description="the memorisation-gap multiplier of final_score (1: none)")
    flags: list[str] = Field(default_factory=list, description="why final_score is not 1/(1+bpb): "
                             "`memorisation_gap ×p`, `step0_anomaly: scored 0`, `implausible: scored 0`, `no_heldout`")


class Leaderboard(BaseModel):
    epoch: int | None = Field(description="the epoch shown; null: all epochs (`?all_epochs=true`)")
    epoch_id: int = Field(description="PRISM's name: the epoch shown, else (all epochs) the current one")
    all_epochs: bool = Field(description="true: every epoch's submissions are ranked")
    computed_at: float
    sigma_seed: float = Field(description="σ_seed (bpb) the verdicts use: measured from replicas, else the prior")
    sigma_seed_measured: float | None = Field(description="σ_seed pooled over the shown entries' replicas")
    sigma_seed_dof: int = Field(description="its degrees of freedom: replicated seeds minus entries")
    entries: list[LeaderboardRow]


class Epoch(BaseModel):
    epoch: int
    epoch_id: int = Field(description="PRISM's name for `epoch`")
    starts_at: float
    ends_at: float
    epoch_seconds: int
    now: float


class Weights(BaseModel):
    weights: dict[str, float] = Field(description="hotkey → weight, summing to 1 (empty: nothing scored)")
    epoch: int = Field(description="the epoch asked for, else the current one")
    all_epochs: bool = Field(description="true: computed over every epoch's submissions (no ?epoch=)")
    mode: str
    computed_at: float
    pending_audits: list[str] = Field(default_factory=list, description="board entries whose re-run has not been "
                                      "judged yet: they earn nothing until it passes, so these weights may change")
    pending_replicas: list[str] = Field(default_factory=list, description="board entries whose seed replicas have "
                                        "not all run: the order around them, and so these weights, may change")
    dry_run: Literal[True] = Field(default=True, description="weights are served, never set on chain")
    challenge_slug: str = Field(description="this challenge's slug (the BASE platform checks it)")
    metadata: dict[str, str] = Field(description="PRISM's metadata: computed_at as ISO 8601")


class RegistryStatus(BaseModel):
    mode: Literal["metagraph", "allowlist", "open"] = Field(description="who may submit (docs/operator.md)")
    source: str | None = Field(description="the snapshot or allow-list file")
    hotkeys: int | None = Field(description="hotkeys it admits; null when open or unreadable")
    synced_at: float | None = Field(description="when the metagraph snapshot was taken")
    problem: str | None = Field(description="why no submission is accepted (no snapshot yet, a malformed file)")


class Health(BaseModel):
    status: Literal["ok"]
    auth_mode: str
    public_submissions: bool
    queue_depth: int
    in_flight: int
    registry: RegistryStatus


class Version(BaseModel):
    name: str
    version: str
    api: str
    api_version: str = Field(description="the BASE challenge API this server speaks")
    challenge_version: str = Field(description="the package version, under the BASE platform's name")
    capabilities: list[str] = Field(description="what the BASE platform may use: get_weights, proxy_routes")
