"""All runtime settings of the API and the workers, in one place (env prefix ``MOTIONGUARD_``).

One class for both processes so an API and its workers deployed from the same environment can
never disagree on the queue name, the storage location or the limits they enforce.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models.bundle_meta import SERVED_BUNDLE_DIR, SHIPPED_BUNDLES


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MOTIONGUARD_", extra="ignore")

    # Infrastructure
    redis_url: str | None = Field(default=None, description="None: 'serve' starts an embedded Redis")
    queue_name: str = "motionguard"
    key_prefix: str = Field(default="motionguard", description="prefix of the service's own Redis keys")
    bundle_dir: Path = Field(
        default=SERVED_BUNDLE_DIR,
        description="the default model (requests naming none); default: the shipped bundle with the better "
        "measured worst case (models.bundle_meta.SERVED_BUNDLE_DIR, docs/robust-model.md)",
    )
    model_repository: Path | None = Field(
        default=None,
        description="a directory of bundles, each a model (worker.repository); None: the shipped bundles when "
        "bundle_dir is one of them, else bundle_dir's bundle alone (a single-model deployment, as before)",
    )
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="models served, 'name' or 'name:version' (empty: every bundle)"
    )
    data_dir: Path = Field(default=Path("./motionguard-data"), description="uploads and blobs (shared with workers)")
    blob_store: Literal["dir", "redis"] = "dir"
    restored_formats: Annotated[list[Literal["mp4", "ffv1", "npz"]], NoDecode] = Field(
        default_factory=lambda: ["mp4", "ffv1", "npz"], description="encoded by the worker for every job"
    )

    # Auth: with keys configured every route but health needs 'Authorization: Bearer <key>'
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Upload and decode limits (decompression bombs are refused before any frame is allocated)
    max_upload_bytes: int = Field(default=100 * 1024 * 1024, ge=1)
    max_pixels: int = Field(default=1920 * 1088, ge=1, description="width x height of the input video")
    max_frames: int = Field(default=3000, ge=1, description="frames decoded per video, at most")
    max_duration_s: float = Field(default=600.0, gt=0)
    max_clips: int = Field(default=16, ge=1, description="clips analysed per job, at most")
    probe_size: int = Field(default=5_000_000, ge=32, description="bytes ffmpeg may read while probing")
    probe_duration_us: int = Field(default=5_000_000, ge=0)

    # Parameter bounds (422 beyond them)
    max_steps: int = Field(default=50, ge=0)
    max_epsilon: float = Field(default=32 / 255, gt=0, le=1)
    max_top_k: int = Field(default=20, ge=1)
    default_top_k: int = Field(default=5, ge=1)
    default_steps: int | None = Field(default=None, ge=0, description="None: the bundle's defence steps")
    defense_mode: Literal["always", "auto", "off"] | None = Field(
        default=None, description="default of defend= when a request names none (None: the bundle's defense.mode)"
    )
    defense_threshold: float | None = Field(
        default=None, gt=0, description="defend=auto purifies clips above this MC loss (None: the bundle's)"
    )

    # Jobs
    job_timeout_base_s: float = Field(default=60.0, gt=0)
    job_timeout_per_clip_step_s: float = Field(
        default=15.0, gt=0, description="sized to the defence's cost on a busy CPU (a 16x128x128 step: ~2-6 s)"
    )
    result_ttl_s: int = Field(default=24 * 3600, ge=1)
    max_queued: int = Field(default=100, ge=1, description="503 when this many jobs wait")
    max_inflight_per_key: int = Field(default=10, ge=1, description="429 past this many unfinished jobs per key")
    max_retries: int = Field(default=1, ge=0, description="requeues of a job whose worker died")
    model_wait_s: float = Field(
        default=300.0, ge=0, description="a job waits this long for a worker with its exact bundle, then fails"
    )
    idempotency_ttl_s: int = Field(default=24 * 3600, ge=1)
    upload_reservation_s: int = Field(
        default=900, ge=1, description="an upload holds its in-flight slot this long at most before its job is queued"
    )
    sweep_interval_s: float = Field(
        default=600.0, gt=0, description="how often 'serve' removes files of jobs whose record has expired"
    )

    # Worker liveness: a dead worker's job is detected within about heartbeat_ttl_s
    heartbeat_interval_s: float = Field(default=1.0, gt=0)
    heartbeat_ttl_s: int = Field(default=5, ge=2)
    recovery_interval_s: float = Field(default=1.0, gt=0)

    # Batching worker (worker.serving.batching): clips of several queued jobs purified as one batch
    max_batch_clips: int = Field(default=1, ge=1, description="clips per batch across jobs (1: one job at a time)")
    max_batch_delay_ms: float = Field(default=10.0, ge=0, description="longest wait for more jobs to fill a batch")
    clip_figures: bool = Field(
        default=True, description="draw each purified clip's flow strip and MC-loss plot (CPU, clip by clip)"
    )
    device: str = "cpu"
    torch_threads: int | None = Field(default=None, ge=1)

    # Drift monitor
    drift_window: int = Field(default=200, ge=10)

    @field_validator("api_keys", "restored_formats", "models", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        """Accept a comma-separated env var as well as a JSON list."""
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                import json

                return json.loads(value)
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @property
    def upload_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def bundle_overrides(self) -> dict:
        """What these settings change in a loaded bundle (``models.bundle.load.load_bundle`` keywords)."""
        return {"mode": self.defense_mode, "threshold": self.defense_threshold}

    @property
    def repository_dir(self) -> Path | None:
        """Where the model repository is scanned (None: it holds the default bundle only).

        Unset, it is the shipped folder whenever the default model is one of the shipped bundles, so
        pointing ``bundle_dir`` at another shipped bundle changes the default, not the models served."""
        if self.model_repository is not None:
            return self.model_repository
        shipped = SHIPPED_BUNDLES.resolve()
        return SHIPPED_BUNDLES if Path(self.bundle_dir).resolve().parent == shipped else None

    def key(self, *parts: str) -> str:
        """A namespaced Redis key of the service (never built from client text except hashed ids)."""
        return ":".join((self.key_prefix, *parts))

    def job_timeout(self, clips: int, steps: int) -> int:
        return int(self.job_timeout_base_s + self.job_timeout_per_clip_step_s * clips * (steps + 2))


@lru_cache
def get_settings() -> Settings:
    return Settings()
