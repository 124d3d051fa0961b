"""All knobs in one place: pydantic settings, overridable by PRISM_* environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
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


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PRISM_", extra="ignore")

    # --- the scored run (DESIGN §4, §5) ---
    data_dir: Path = Field(default=EMBEDDED_DATA_DIR, description="locked dataset (train/val/test + MANIFEST.json)")
    cache_dir: Path = Field(default_factory=default_cache_dir, description="token caches and run dirs")
    byte_budget: int = Field(default=300_000, ge=0, description="target bytes scored per run; 0 = whole train split")
    time_limit: float = Field(default=900.0, gt=0, description="wall-clock safety cap of a training run, seconds")
    seed: int = 1337
    max_seq_len: int = Field(default=1024, ge=2)
    max_params: int = Field(default=150_000_000, ge=1)
    default_batch_size: int = Field(default=8, ge=1)
    curve_points: int = Field(default=500, ge=2)
    encode_threads: int = Field(default=0, ge=0, description="token-cache build threads; 0 = all cores")
    runner_threads: int = Field(default=0, ge=0, description="torch threads in the runner; 0 = all cores")
    device: str = Field(default="auto", description="auto = the run's GPU when there is one, else cpu")
    intake: IntakeLimits = Field(default_factory=lambda: IntakeLimits())


def load_settings(**overrides) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


class GateSettings(BaseSettings):
    """The LLM hard gate (DESIGN §6). Any OpenAI-compatible endpoint works; OpenRouter by default."""

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
