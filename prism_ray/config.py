"""All knobs in one place: pydantic settings, overridable by PRISM_* environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PACKAGE_DIR = Path(__file__).resolve().parent
EMBEDDED_DATA_DIR = PACKAGE_DIR / "data" / "embedded" / "python-docs-edu"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "prism-ray"


class IntakeLimits(BaseSettings):
    """Bundle intake limits; sizes are measured while streaming, never trusted from zip headers."""

    model_config = SettingsConfigDict(env_prefix="PRISM_INTAKE_", extra="ignore")

    max_files: int = 64
    max_member_bytes: int = 1_000_000
    max_total_bytes: int = 4_000_000
    allowed_suffixes: tuple[str, ...] = (".py", ".yaml", ".yml", ".json", ".toml", ".txt", ".md")


class SandboxSettings(BaseSettings):
    """Limits of the sandbox every execution of miner code runs in (docs/architecture.md, "Trust boundaries")."""

    model_config = SettingsConfigDict(env_prefix="PRISM_SANDBOX_", extra="ignore")

    mode: Literal["required", "auto", "off"] = Field(
        default="auto", description="required: refuse without bubblewrap (cluster); auto: warn loudly (local eval)")
    memory_bytes: int = Field(default=16 << 30, description="RLIMIT_AS of the runner on CPU runs")
    artifacts_quota_bytes: int = 256 << 20
    tmp_quota_bytes: int = 1 << 30
    file_size_bytes: int = 1 << 30
    max_processes: int = 512
    hide: list[Path] = Field(default_factory=list, description="extra paths the sandbox must not see")


class GateSettings(BaseSettings):
    """The LLM hard gate (docs/gate.md). Any OpenAI-compatible endpoint works; OpenRouter by default."""

    model_config = SettingsConfigDict(env_prefix="PRISM_GATE_", extra="ignore")

    mode: Literal["required", "optional", "off"] = "optional"
    base_url: str = "https://openrouter.ai/api/v1"
    model: str = "anthropic/claude-sonnet-4.5"
    api_key_file: Path | None = Field(default=None, description="file holding the key; wins over api_key_env")
    api_key_env: str = Field(default="OPENROUTER_API_KEY", description="environment variable holding the key")
    timeout_s: float = Field(default=60.0, gt=0, description="per-request timeout, seconds")
    max_attempts: int = Field(default=4, ge=1, description="calls per review, first one included")
    backoff_s: float = Field(default=1.0, ge=0, description="first retry delay; doubles each retry")
    max_retry_after_s: float = Field(default=30.0, ge=0, description="longest Retry-After honoured; longer holds")
    max_review_chars: int = Field(default=200_000, ge=1, description="larger bundles are rejected, never truncated")


class RankingSettings(BaseSettings):
    """The decided order (docs/scoring.md, "The decided order"): when two runs differ by more than their noise."""

    model_config = SettingsConfigDict(env_prefix="PRISM_RANKING_", extra="ignore")

    chunks: int = Field(default=64, ge=2, description="equal byte chunks of the scored stream a run's nats are "
                        "attributed to (at batch resolution)")
    block_chunks: int = Field(default=8, ge=1, description="chunks per block of the block bootstrap: neighbouring "
                              "chunks of a learning curve are correlated, blocks keep that")
    resamples: int = Field(default=2000, ge=100, description="bootstrap resamples per comparison")
    confidence: float = Field(default=0.99, gt=0.5, lt=1, description="one-sided confidence that one run is better")
    dead_zone_bpb: float = Field(default=0.002, ge=0, description="differences of at most this many bpb count as "
                                 "none: per chunk (undecided chunks) and on the mean (its bound must clear it)")
    min_decided_chunks: int = Field(default=16, ge=0, description="chunks outside the dead zone needed for a verdict")
    bootstrap_seed: int = Field(default=20_231_123, description="pinned: every validator draws the same resamples")
    seed_sigma_prior: float = Field(default=0.012, ge=0, description="σ_seed (bpb) used until an epoch has "
                                    "measured its own from replicas (the later PRISM's published lower bound)")
    min_sigma_dof: int = Field(default=4, ge=1, description="degrees of freedom (replicated seeds minus entries) an "
                               "epoch needs before its measured σ_seed replaces the prior")


class ReplicaSettings(BaseSettings):
    """Seed replicas (docs/scoring.md, "Seed replicas"): the top entries re-run with secret seeds."""

    model_config = SettingsConfigDict(env_prefix="PRISM_REPLICA_", extra="ignore")

    mode: Literal["on", "off"] = Field(default="on", description="off: no replicas; every comparison uses the "
                                       "σ_seed prior")
    count: int = Field(default=2, ge=1, description="R: extra seeds per replicated entry")
    top_k: int = Field(default=3, ge=0, description="each epoch's top k, and any entry that would enter it, get "
                       "replicas")
    secret: str = Field(default="", description="operator secret the seeds are drawn from (HMAC); revealed per "
                        "epoch once it closes. Empty: a random secret per process (tests, demo)")
    max_attempts: int = Field(default=3, ge=1, description="claims of a replica before infra:attempts_exhausted")


class ScoringSettings(BaseSettings):
    """Constants of final_score, the leaderboard and the weights (docs/scoring.md)."""

    model_config = SettingsConfigDict(env_prefix="PRISM_SCORING_", extra="ignore")

    epsilon: float = Field(default=0.005, gt=0, le=0.5,
                           description="bpb distance below which the held-out tie-break may reorder two runs")
    tie_break_delta_scale: float = Field(default=1.0, gt=0,
                                         description="held-out delta (bpb) that earns half of the tie-break credit")
    gap_threshold: float = Field(default=0.25, ge=0, description="train/val bpb gap tolerated without penalty")
    gap_penalty_slope: float = Field(default=5.0, ge=0, description="penalty decay per bpb of gap over the threshold")
    gap_penalty_floor: float = Field(default=0.1, gt=0, le=1, description="the lowest the gap penalty goes")
    anomaly_fraction: float = Field(default=0.9, ge=0, le=1, description="batch j's mean loss below this^(j+1) · "
                                    "ln(vocab), for j < anomaly_batches, zeroes the score")
    anomaly_batches: int = Field(default=4, ge=1, description="how many first batches the anomaly check covers")
    impossible_fraction: float = Field(default=0.5, ge=0, le=1, description="plausibility: a first batch below "
                                       "this · ln(vocab) cannot come from an untrained model, anomaly rule or not")
    plausibility_margin_bpb: float = Field(default=0.5, ge=0, description="plausibility: the prequential bpb may "
                                           "beat the trained model's own held-out val bpb by at most this much")
    heldout_byte_budget: int = Field(default=50_000, ge=1, description="target bytes of each held-out pass")
    epoch_seconds: int = Field(default=86_400, ge=1, description="length of a leaderboard epoch, seconds")
    weights_mode: Literal["per_hotkey", "two_tier", "winner_take_all", "ranked"] = "per_hotkey"
    ranked_decay: float = Field(default=0.5, gt=0, lt=1, description="ranked weights: each decided place gets this "
                                "fraction of what the place above it gets (1/2, 1/4, ... by default)")
    ranking: RankingSettings = Field(default_factory=lambda: RankingSettings())
    two_tier_split: tuple[float, float] = Field(default=(0.60, 0.40),
                                                description="(architecture owner, best training variant's owner)")
    priority_epsilon: float = Field(default=0.005, ge=0, le=0.5, description="time priority: a later submission "
                                    "ranks above an earlier one only if its final score is higher by more than this "
                                    "fraction (at age 0; 0 = off)")
    priority_decay_seconds: float = Field(default=7 * 86_400, gt=0, description="time priority: the margin falls "
                                          "linearly to 0 as the earlier submission's head start grows to this")
    copy_batches: int = Field(default=8, ge=1, description="copies by behaviour: runs whose first this many "
                              "per-batch losses agree are the same learner")

    @field_validator("two_tier_split")
    @classmethod
    def _split_sums_to_one(cls, split: tuple[float, float]) -> tuple[float, float]:
        if min(split) < 0 or abs(sum(split) - 1.0) > 1e-9:
            raise ValueError(f"two_tier_split must be two non-negative shares summing to 1, got {split}")
        return split


class AuditSettings(BaseSettings):
    """Re-execution audits (docs/scoring.md, "Audits"): which completed scores are re-run on another node, and how
    close the re-run's bpb must come, before a score earns weight."""

    model_config = SettingsConfigDict(env_prefix="PRISM_AUDIT_", extra="ignore")

    mode: Literal["on", "off"] = Field(default="on", description="off: nothing is re-run and every score earns at "
                                       "once (a trusted single-node setup)")
    top_k: int = Field(default=3, ge=0, description="the best k entries of each epoch's board are always audited")
    sample_rate: float = Field(default=0.1, ge=0, le=1, description="chance that any other completed score is "
                               "audited, drawn once when it completes")
    cpu_rtol: float = Field(default=0.0, ge=0, description="relative bpb difference tolerated when both runs used the "
                            "CPU (0: bit-identical)")
    cuda_rtol: float = Field(default=1e-4, ge=0, description="relative bpb difference tolerated when a run used CUDA")
    max_attempts: int = Field(default=3, ge=1, description="claims of an audit before it fails "
                              "infra:attempts_exhausted")


class ClusterSettings(BaseSettings):
    """The Ray layer (prism_ray/cluster, docs/operator.md): the store file, capacity, liveness and stage limits."""

    model_config = SettingsConfigDict(env_prefix="PRISM_CLUSTER_", extra="ignore")

    store_path: Path | None = Field(default=None, description="the DuckDB file, on the head node; "
                                    "None = <cache_dir>/prism.duckdb")
    namespace: str = Field(default="prism-ray", description="Ray namespace of the detached store and scheduler")
    dashboard: bool = Field(default=True, description="start Ray's dashboard with a cluster prism-ray starts itself "
                            "(a few CPU-seconds at start and a resident process on the head)")
    capacity: int = Field(default=0, ge=0, description="submissions in flight at once; 0 = the cluster's GPU count")
    max_attempts: int = Field(default=3, ge=1, description="claims of a submission before infra:attempts_exhausted")
    max_infra_requeues: int = Field(default=3, ge=0, description="uncharged requeues of a submission after operator-"
                                    "side faults (infra:disk_full, ...) before it is held for the operator")
    lease_seconds: float = Field(default=60.0, gt=0, description="a running submission whose lease is not renewed "
                                 "for this long is requeued")
    heartbeat_seconds: float = Field(default=2.0, gt=0, description="how often leases are renewed and progress "
                                     "is written (heartbeats are coalesced in between)")
    poll_seconds: float = Field(default=0.5, gt=0, description="the scheduler's loop period when nothing finishes")
    cpu_stage_seconds: float = Field(default=600.0, gt=0, description="wall-clock limit of a CPU stage "
                                     "(check, gate, score)")
    gpu_stage_grace_seconds: float = Field(default=300.0, ge=0, description="added to time_limit for a GPU stage "
                                           "(train, heldout): runner start-up and a first token-cache build")
    stage_limits: dict[str, float] = Field(default_factory=dict, description="per-stage limits in seconds that "
                                           "replace the two above, e.g. {\"train\": 1200}")
    cpus_per_gpu_stage: float = Field(default=1.0, ge=0, description="CPUs reserved with each GPU stage's GPU")
    cpus_per_cpu_stage: float = Field(default=0.25, ge=0, description="CPUs reserved by a check, gate or score task")
    min_free_bytes: int = Field(default=1 << 30, ge=0, description="free disk the store's filesystem must keep: "
                                "below it /health answers 503 and intake 503 infra:disk_full")
    health_probe_seconds: float = Field(default=5.0, gt=0, description="how long a store probe (a read and a "
                                        "write) answers for /health and intake before the next one")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PRISM_", extra="ignore")

    # --- the scored run (docs/scoring.md, docs/miner.md) ---
    data_dir: Path = Field(default=EMBEDDED_DATA_DIR, description="locked dataset (train/val/test + MANIFEST.json)")
    cache_dir: Path = Field(default_factory=default_cache_dir, description="token caches and run dirs")
    byte_budget: int = Field(default=200_000, ge=0, description="target bytes scored per run; 0 = whole train split")
    heldout_time_limit: float = Field(default=300.0, gt=0, description="wall-clock cap of the held-out evaluation")
    probe_time_limit: float = Field(default=120.0, gt=0, description="wall-clock cap of the instantiation probe")
    causality_probe_every: int = Field(default=4, ge=0, description="probe one scored batch in this many on average "
                                       "(the first always), chosen in secret; 0 = off, for benchmarks only")
    time_limit: float = Field(default=900.0, gt=0, description="wall-clock safety cap of a training run, seconds")
    seed: int = 1337
    max_seq_len: int = Field(default=1024, ge=2)
    max_params: int = Field(default=150_000_000, ge=1)
    curve_points: int = Field(default=500, ge=2)
    encode_threads: int = Field(default=0, ge=0, description="token-cache build threads; 0 = all cores")
    runner_threads: int = Field(default=0, ge=0, description="torch threads in the runner; 0 = all cores")
    device: str = Field(default="auto", description="auto = the run's GPU when there is one, else cpu")
    # --- several ranks (docs/miner.md "Several GPUs", docs/operator.md) ---
    gpus_per_run: int = Field(default=1, ge=1, le=8, description="trainer ranks of a scored run, one GPU each (a "
                              "num_gpus=N train task); on CPU, gloo ranks")
    rank_timeout: float = Field(default=120.0, gt=0, description="seconds a trainer rank may trail the first one to "
                                "a step (iter_train_batches, a batch, the end) before the run fails run:rank_hung")
    gpu_handoff: Literal["host", "stream"] = Field(default="host", description="how a batch reaches the ranks on "
                                                   "a GPU: host (a host sync and the rows in a frame) or stream (the "
                                                   "GPUs' streams order it; not yet measured on a GPU)")
    contract_world_sizes: str = Field(default="2", pattern=r"^\s*([2-8]\s*(,\s*[2-8]\s*)*)?$",
                                      description="world sizes of the unscored multi-GPU contract check before the "
                                      "scored run (gloo on CPU), comma-separated; empty = off")
    contract_policy: Literal["flag", "reject"] = Field(default="flag", description="a failed contract check only "
                                                        "shows (flag) or rejects the bundle (contract:multi_gpu)")
    contract_batches: int = Field(default=3, ge=1, description="batches each contract check trains on")
    contract_time_limit: float = Field(default=300.0, gt=0, description="wall-clock cap of one contract check")
    intake: IntakeLimits = Field(default_factory=lambda: IntakeLimits())
    sandbox: SandboxSettings = Field(default_factory=lambda: SandboxSettings())
    gate: GateSettings = Field(default_factory=lambda: GateSettings())
    scoring: ScoringSettings = Field(default_factory=lambda: ScoringSettings())
    audit: AuditSettings = Field(default_factory=lambda: AuditSettings())
    replicas: ReplicaSettings = Field(default_factory=lambda: ReplicaSettings())
    cluster: ClusterSettings = Field(default_factory=lambda: ClusterSettings())


def contract_sizes(settings: Settings) -> list[int]:
    """The world sizes PRISM_CONTRACT_WORLD_SIZES names (each 2..8, checked by the field's pattern)."""
    return [int(part) for part in settings.contract_world_sizes.split(",") if part.strip()]


def load_settings(**overrides) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class RejectionCap:
    """At most `per_hotkey` (and `total`) stored rejections created within `window_s`; past it a rejection is
    answered but not stored, so no client can fill the store with broken bundles."""

    per_hotkey: int
    total: int
    window_s: float


RegistryMode = Literal["metagraph", "allowlist", "open"]


class RegistrySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PRISM_REGISTRY_", extra="ignore")

    mode: RegistryMode | None = Field(default=None, description="metagraph, allowlist or open; unset: metagraph "
                                      "under signed auth, open under dev auth")
    file: Path | None = Field(default=None, description="the snapshot (metagraph) or the list (allowlist); default "
                              "for metagraph: <PRISM_CACHE_DIR>/registry/metagraph-<netuid>.json")
    netuid: int = Field(default=100, ge=0, description="the subnet `registry sync` reads")
    network: str = Field(default="finney", description="the chain endpoint `registry sync` reads (a network name "
                         "or a ws:// URL)")

    def mode_for(self, auth_mode: str) -> RegistryMode:
        return self.mode or ("open" if auth_mode == "dev" else "metagraph")

    def path(self, cache_dir: Path) -> Path:
        return self.file or cache_dir / "registry" / f"metagraph-{self.netuid}.json"


class ConnectionLimits(BaseSettings):
    """What one HTTP connection may cost the server before the app sees a request (docs/operator.md, "HTTP
    limits"), from PRISM_API_* variables. Enforced by serve_app/connection_guard.py under uvicorn and Ray Serve."""

    model_config = SettingsConfigDict(env_prefix="PRISM_API_", extra="ignore")

    max_header_bytes: int = Field(default=16_384, ge=1024, description="request line and headers together")
    max_headers: int = Field(default=64, ge=8, description="header fields in one request")
    header_timeout_s: float = Field(default=10.0, gt=0, description="from a connection's (or its previous "
                                    "response's) start to the end of the next request's headers")
    body_timeout_s: float = Field(default=60.0, gt=0, description="from the end of the headers to the end of the "
                                  "body: a 5 MB body needs 85 KB/s")
    max_connections_per_address: int = Field(default=128, ge=1, description="open connections from one client "
                                             "address (a reverse proxy in front counts as one address)")



class ApiSettings(BaseSettings):
    """Knobs of the HTTP layer, from PRISM_API_* variables (the internal token also from PRISM_INTERNAL_TOKEN)."""

    model_config = SettingsConfigDict(env_prefix="PRISM_API_", extra="ignore", populate_by_name=True)

    max_body_bytes: int = Field(default=5_000_000, ge=1, description="largest request body; counted while reading")
    rate_limit_burst: int = Field(default=5, ge=1, description="submissions a hotkey may make back to back")
    rate_limit_per_minute: float = Field(default=1.0, gt=0, description="refill rate of each hotkey's bucket")
    public_submissions: bool = Field(default=True, description="off: POST /v1/submissions answers 404")
    auth_mode: Literal["signed", "dev"] = Field(
        default="signed", description="dev trusts an unsigned X-Hotkey: for a local demo only, never exposed")
    internal_token: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("internal_token", "PRISM_INTERNAL_TOKEN", "PRISM_API_INTERNAL_TOKEN"),
        description="bearer token of /internal routes; unset (and no file): those routes answer 503")
    internal_token_file: Path | None = Field(default=None, description="file holding the bearer token; wins")
    challenge_slug: str = Field(
        default="prism", validation_alias=AliasChoices("challenge_slug", "PRISM_API_CHALLENGE_SLUG", "CHALLENGE_SLUG"),
        description="this challenge's slug on the BASE platform: X-Base-Challenge-Slug must name it")
    timestamp_window_s: float = Field(default=300.0, gt=0, description="accepted |X-Timestamp − now|, seconds")
    nonce_ttl_s: float = Field(default=600.0, gt=0, description="how long a used nonce is remembered, seconds")
    stored_rejections_per_hotkey: int = Field(
        default=20, ge=0, description="rejected submissions stored per hotkey per rejection window; past it a "
        "broken bundle is still answered 422 with its reasons, but not stored")
    stored_rejections_total: int = Field(default=5_000, ge=0,
                                         description="rejected submissions stored per rejection window, all hotkeys")
    rejection_window_s: float = Field(default=86_400.0, gt=0, description="the window of both bounds, seconds")
    address_rate_limit_burst: int = Field(default=20, ge=1, description="submissions one client address may make "
                                          "back to back, counted before authentication")
    address_rate_limit_per_minute: float = Field(default=10.0, gt=0, description="refill rate of each address's "
                                                 "bucket")
    registry: RegistrySettings = Field(default_factory=lambda: RegistrySettings(),
                                       description="who may submit (PRISM_REGISTRY_*; docs/operator.md)")

    @model_validator(mode="after")
    def _nonce_outlives_window(self) -> ApiSettings:
        # A timestamp stays acceptable for 2·window seconds; a nonce forgotten sooner could be replayed.
        if self.nonce_ttl_s < 2 * self.timestamp_window_s:
            raise ValueError(f"nonce_ttl_s ({self.nonce_ttl_s:g}) must be at least twice timestamp_window_s "
                             f"({self.timestamp_window_s:g}), or a signed request could be replayed")
        return self

    def rejection_cap(self) -> RejectionCap:
        return RejectionCap(self.stored_rejections_per_hotkey, self.stored_rejections_total, self.rejection_window_s)

    def bearer_token(self) -> str | None:
        if self.internal_token_file is not None:
            return self.internal_token_file.read_text().strip() or None
        return self.internal_token.get_secret_value() if self.internal_token else None
