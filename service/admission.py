"""Admission control before an upload is accepted: queue capacity, per-key in-flight cap, and
idempotency keys. All state lives in Redis so any number of API processes agree."""

from __future__ import annotations

import hashlib

from redis import Redis

from service.errors import RETRY_AFTER_S, ApiError
from worker.settings import Settings

TERMINAL = {b"finished", b"failed", b"canceled", b"stopped"}
PENDING = "pending"


def check_queue(connection: Redis, settings: Settings) -> None:
    if connection.llen(f"rq:queue:{settings.queue_name}") >= settings.max_queued:
        raise ApiError(
            503,
            "queue_full",
            "the queue is full; retry later",
            reason="queue_full",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )


def inflight_key(settings: Settings, owner: str) -> str:
    return settings.key("inflight", owner)


def check_inflight(connection: Redis, settings: Settings, owner: str) -> None:
    """429 when the key already has ``max_inflight_per_key`` unfinished jobs (ended ones are pruned)."""
    key = inflight_key(settings, owner)
    members = [m.decode() for m in connection.smembers(key)]
    if members:
        with connection.pipeline(transaction=False) as pipe:
            for job_id in members:
                pipe.hget(f"rq:job:{job_id}", "status")
            statuses = pipe.execute()
        done = [m for m, s in zip(members, statuses, strict=True) if s is None or s in TERMINAL]
        if done:
            connection.srem(key, *done)
        members = [m for m in members if m not in done]
    if len(members) >= settings.max_inflight_per_key:
        raise ApiError(
            429,
            "too_many_jobs",
            f"at most {settings.max_inflight_per_key} jobs in flight per key",
            reason="rate_limited",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )


def add_inflight(connection: Redis, settings: Settings, owner: str, job_id: str) -> None:
    key = inflight_key(settings, owner)
    connection.sadd(key, job_id)
    connection.expire(key, settings.result_ttl_s)


def idempotency_key(settings: Settings, owner: str, client_key: str) -> str:
    return settings.key("idem", owner, hashlib.sha256(client_key.encode()).hexdigest())


def reserve_idempotency(connection: Redis, settings: Settings, owner: str, client_key: str) -> str | None:
    """Reserve the key for a new job; returns the existing job id if this key was used before."""
    key = idempotency_key(settings, owner, client_key)
    if connection.set(key, PENDING, nx=True, ex=settings.idempotency_ttl_s):
        return None
    value = connection.get(key)
    value = value.decode() if value else None
    if value in (None, PENDING):
        raise ApiError(409, "idempotency_in_progress", "a request with this Idempotency-Key is still being processed")
    return value


def complete_idempotency(connection: Redis, settings: Settings, owner: str, client_key: str, job_id: str) -> None:
    connection.set(idempotency_key(settings, owner, client_key), job_id, ex=settings.idempotency_ttl_s)


def release_idempotency(connection: Redis, settings: Settings, owner: str, client_key: str) -> None:
    connection.delete(idempotency_key(settings, owner, client_key))
