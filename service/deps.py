"""Request dependencies: settings, the Redis connection, and the API-key owner of a request."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis import Redis

from service.errors import ApiError
from worker.settings import Settings

ANONYMOUS = "anonymous"
_bearer = HTTPBearer(auto_error=False, description="API key (when the service has keys configured)")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_redis(request: Request) -> Redis:
    return request.app.state.redis


def owner_of(key: str) -> str:
    """A stable, non-reversible owner id for an API key (stored in job meta instead of the key)."""
    return hashlib.sha256(key.encode()).hexdigest()[:24]


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[Redis, Depends(get_redis)]


def require_owner(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    settings: SettingsDep,
) -> str:
    """The owner id of the request's key; 401 when keys are configured and none (or a wrong one) is sent."""
    if not settings.api_keys:
        return ANONYMOUS
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ApiError(
            401,
            "unauthorized",
            "missing API key (Authorization: Bearer <key>)",
            reason="unauthorized",
            headers={"WWW-Authenticate": "Bearer"},
        )
    sent = credentials.credentials.encode()
    matched = None
    for key in settings.api_keys:  # compare against every key: timing reveals nothing about which matched
        if hmac.compare_digest(sent, key.encode()):
            matched = key
    if matched is None:
        raise ApiError(
            401, "unauthorized", "wrong API key", reason="unauthorized", headers={"WWW-Authenticate": "Bearer"}
        )
    return owner_of(matched)


Owner = Annotated[str, Depends(require_owner)]
