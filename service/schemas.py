"""Response models of the HTTP contract (they document the API in OpenAPI)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from service.errors import ErrorDetail

JobState = Literal["queued", "started", "finished", "failed", "canceled"]


class JobAccepted(BaseModel):
    job_id: str = Field(description="128-bit random id, hex")
    status: JobState
    status_url: str


class LabelScore(BaseModel):
    label: str
    index: int
    score: float


class ClipResult(BaseModel):
    index: int
    start_frame: int
    end_frame: int
    labels: list[LabelScore]
    mc_loss_before: float
    mc_loss_after: float
    suspected_attack: bool = Field(description="the attack flag is up: attack_score > 1")
    attack_score: float | None = Field(
        default=None,
        description="the flag's combined score over its threshold (> 1: suspected attack): the largest clean-tail "
        "surprise of the signals, or, for a bundle without a flag calibration, MC loss / threshold; null when the "
        "bundle has no calibration or the result was stored before the field existed",
    )
    signals: dict[str, float] = Field(
        default_factory=dict,
        description="the flag's signal values: mc, mc_multi, updates, noise, margin, purify_change (purified clips)",
    )
    mc_trajectory: list[float] = Field(default_factory=list, description="MC loss per defence step")
    decision: Literal["purified", "stopped_early", "skipped", "off"] | None = Field(
        default=None,
        description="purified (all steps), stopped_early (reached the early-stop target), skipped (defend=auto, "
        "MC loss at or under the threshold: classified as it is), off (defend=false); null in results "
        "stored before the field existed",
    )
    defence_steps: int | None = Field(
        default=None, description="purification steps spent on the clip (forward + backward each)"
    )
    flow_url: str | None = Field(default=None, description="purified clips: frames + flow before/after (PNG)")
    mc_loss_url: str | None = Field(default=None, description="purified clips: MC loss per defence step (PNG)")


class ModelRef(BaseModel):
    """The bundle that computed a result (worker.repository)."""

    name: str
    version: str
    sha256: str | None = Field(
        default=None,
        description="sha256 of the bundle's bundle.json (which records the sha256 of every weight file); "
        "null in results stored before it was recorded",
    )


class JobResult(BaseModel):
    model: ModelRef
    defended: bool
    defense: dict = Field(
        default_factory=dict, description="mode (always/auto/off), steps, epsilon, multi and (auto) threshold used"
    )
    labels: list[LabelScore] = Field(description="the video's labels: mean of the clips' probabilities")
    clips: list[ClipResult]
    video: dict = Field(default_factory=dict, description="source size, fps, decoded and restored frame counts")
    calibration_threshold: float | None = None
    timings_ms: dict[str, float] = Field(description="queue, decode, defense, classify, encode, total")
    batch: dict[str, int] = Field(
        default_factory=dict, description="clips and jobs of the largest batch this job's clips were computed in"
    )
    restored_url: str | None
    restored_formats: list[str] = Field(default_factory=list)


class JobInfo(BaseModel):
    job_id: str
    status: JobState
    created_at: datetime | None
    started_at: datetime | None
    ended_at: datetime | None
    result: JobResult | None = None
    error: ErrorDetail | None = None
    queue_position: int | None = Field(default=None, description="queued jobs: how many jobs wait ahead of it")


class Canceled(BaseModel):
    job_id: str
    status: JobState


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    ready: bool
    redis: bool
    workers: int = Field(description="live workers (heartbeat within the last few seconds)")
    bundle_loaded: bool = Field(description="a live worker has this service's bundle loaded")
    checks: dict[str, str] = Field(default_factory=dict)


class DefenseDefaults(BaseModel):
    steps: int
    step_size: float
    epsilon: float
    multi: bool
    mode: Literal["always", "auto", "off"] = Field(default="always", description="what defend= defaults to")
    threshold: float | None = Field(default=None, description="defend=auto purifies clips above this MC loss")


class Limits(BaseModel):
    max_upload_bytes: int
    max_steps: int
    max_epsilon: float
    max_top_k: int
    max_clips: int


class ModelInfo(BaseModel):
    """One bundle of the model repository."""

    name: str
    version: str
    sha256: str = Field(description="sha256 of its bundle.json: what jobs are pinned to and results carry")
    labels: list[str]
    input: dict
    defense: DefenseDefaults
    calibration: dict | None
    served: bool = Field(description="this deployment accepts jobs for it (MOTIONGUARD_MODELS)")
    default: bool = Field(description="what POST /classify uses when the request names no model")
    workers: list[str] = Field(description="live workers that have exactly this bundle loaded")


class ModelsInfo(BaseModel):
    """``GET /models``: the default model's fields at the top (as before several models existed),
    the server's limits, and every bundle of the repository under ``models``."""

    name: str
    version: str
    sha256: str | None = None
    labels: list[str]
    input: dict
    defense: DefenseDefaults
    calibration: dict | None
    limits: Limits
    models: list[ModelInfo] = Field(default_factory=list)
