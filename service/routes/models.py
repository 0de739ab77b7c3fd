"""``GET /models`` and ``GET /models/{name}``: the model repository (``worker.repository``), and the
one place a request's ``model``/``version`` is resolved to a bundle (``resolve_model``).

The repository is read when the app starts (bundle metadata only: plain JSON, no weights), and again
when a request names a model it does not hold (at most every ``RESCAN_S``). Which
workers serve a model comes from the workers' liveness keys, matched on name, version and digest.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request

from models.defense_mode import resolve_policy
from service.deps import Owner, RedisDep, SettingsDep
from service.errors import ApiError, ErrorBody, responses
from service.schemas import DefenseDefaults, Limits, ModelInfo, ModelsInfo
from worker.liveness import live_workers
from worker.repository import ModelEntry, ModelNotFound, ModelNotServed, Repository
from worker.settings import Settings

router = APIRouter(tags=["models"])

UNKNOWN_MODEL = {404: {"model": ErrorBody, "description": "no such model (or version) in the repository"}}


def repository(request: Request) -> Repository:
    """The app's repository (an empty one before the lifespan has read it)."""
    return getattr(request.app.state, "repository", None) or Repository([], None)


def resolve_model(request: Request, name: str | None, version: str | None) -> ModelEntry:
    """The bundle a ``POST /classify`` is for: 404 unknown model or version, 422 not served here,
    503 when the default is asked for and no default bundle is readable."""
    repo = repository(request)
    if name is None and repo.default is None:
        settings: Settings = request.app.state.settings
        raise ApiError(
            503,
            "no_bundle",
            f"no readable bundle at {settings.bundle_dir}",
            reason="unavailable",
            headers={"Retry-After": "30"},
        )
    try:
        try:
            return repo.resolve(name, version)
        except ModelNotFound:
            repo = rescan(request)  # a bundle added since the last scan is found without a restart
            if repo is None:
                raise
            return repo.resolve(name, version)
    except ModelNotFound as exc:
        raise ApiError(404, "unknown_model", str(exc), reason="unknown_model") from None
    except ModelNotServed as exc:
        raise ApiError(422, "model_not_served", str(exc), reason="bad_parameter") from None


RESCAN_S = 10.0  # at most one rescan of the repository per this many seconds, on a miss


def rescan(request: Request) -> Repository | None:
    """Read the repository again (metadata only) when the last scan is older than ``RESCAN_S``; the
    new repository, or None when it was read too recently."""
    state = request.app.state
    now = time.monotonic()
    if now - getattr(state, "repository_scanned_at", 0.0) < RESCAN_S:
        return None
    state.repository_scanned_at = now
    state.repository = Repository.scan(state.settings)
    return state.repository


def serving_workers(workers: list[dict], entry: ModelEntry) -> list[str]:
    """Names of the live workers that have exactly this bundle loaded (digest when they publish one)."""
    return sorted(
        str(w.get("name", "?"))
        for w in workers
        if w.get("bundle") == entry.name
        and w.get("version") == entry.version
        and w.get("sha256", entry.sha256) == entry.sha256
    )


def model_info(entry: ModelEntry, repo: Repository, settings: Settings, workers: list[dict]) -> ModelInfo:
    meta, d = entry.meta, entry.meta.defense
    policy = resolve_policy(meta, **settings.bundle_overrides)
    return ModelInfo(
        name=entry.name,
        version=entry.version,
        sha256=entry.sha256,
        labels=meta.labels,
        input=meta.input.model_dump(),
        defense=DefenseDefaults(
            steps=d.steps,
            step_size=d.step_size,
            epsilon=d.epsilon,
            multi=d.multi,
            mode=policy.default_mode,
            threshold=policy.mc_threshold,
        ),
        calibration=(
            {k: v for k, v in meta.calibration.model_dump().items() if k != "sample"} if meta.calibration else None
        ),
        served=repo.is_served(entry),
        default=entry == repo.default,
        workers=serving_workers(workers, entry),
    )


def _workers(connection, settings: Settings) -> list[dict]:
    try:
        return live_workers(connection, settings)
    except Exception:  # noqa: BLE001 - the list is informative; Redis away must not hide the models
        return []


@router.get(
    "/models",
    response_model=ModelsInfo,
    summary="The model repository: every bundle (name, version, sha256, labels, input, defence defaults, "
    "calibration, which workers serve it); the default model's fields and the limits at the top",
    responses=responses(401, 503),
)
def list_models(request: Request, _owner: Owner, settings: SettingsDep, connection: RedisDep) -> ModelsInfo:
    repo = repository(request)
    if repo.default is None:
        raise ApiError(503, "no_bundle", f"no readable bundle at {settings.bundle_dir}", headers={"Retry-After": "30"})
    workers = _workers(connection, settings)
    models = [model_info(entry, repo, settings, workers) for entry in repo.entries]
    default = next(m for m in models if m.default)
    return ModelsInfo(
        **default.model_dump(include={"name", "version", "sha256", "labels", "input", "defense", "calibration"}),
        limits=Limits(
            max_upload_bytes=settings.max_upload_bytes,
            max_steps=settings.max_steps,
            max_epsilon=settings.max_epsilon,
            max_top_k=settings.max_top_k,
            max_clips=settings.max_clips,
        ),
        models=models,
    )


@router.get(
    "/models/{name}",
    response_model=ModelInfo,
    summary="One model of the repository: the version a request naming it gets, or ?version=V",
    responses={**responses(401), **UNKNOWN_MODEL},
)
def get_model(
    request: Request,
    _owner: Owner,
    settings: SettingsDep,
    connection: RedisDep,
    name: Annotated[str, Path(max_length=200, description="the bundle's name (bundle.json)")],
    version: Annotated[str | None, Query(max_length=200, description="a version (default: the served one)")] = None,
) -> ModelInfo:
    repo = repository(request)
    try:
        entry = repo.resolve(name, version, served_only=False)
        if version is None and not repo.is_served(entry):
            entry = repo.resolve(name, None, served_only=True)
    except ModelNotServed:
        pass
    except ModelNotFound as exc:
        raise ApiError(404, "unknown_model", str(exc)) from None
    return model_info(entry, repo, settings, _workers(connection, settings))
