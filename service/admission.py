"""Admission control before an upload is accepted: idempotency keys, queue capacity and the per-key
in-flight cap, decided by one Lua script so any number of API processes agree exactly.

A check-then-add in Python lets simultaneous uploads of one key through together (each sees room,
then each adds itself). The script runs atomically in Redis: it replays an earlier job of the same
Idempotency-Key, else refuses when the queue is full or the key has ``max_inflight_per_key``
unfinished jobs, else reserves a slot for the new job id (and the Idempotency-Key, as pending).

The slots of a key are a sorted set ``<prefix>:inflight_jobs:<owner>`` of job ids. A slot counts
while its RQ job is not terminal; before the job is enqueued (upload and probe still running) it
counts until its score, a deadline ``upload_reservation_s`` away, so an API process that dies
mid-upload frees its slot by itself. ``release`` frees it at once when the upload is refused.

The queue cap (``max_queued``, per model) is reserved the same way, in the same script: the model's
sorted set ``<prefix>:queued_jobs:<model>`` holds a slot for every job admitted and not yet taken by
a worker. Counting the queue list alone let every upload still being received pass (32 of 32 at a
cap of 3 across two API processes): an upload joins the list only once it is stored and probed.
A slot is free again as soon as its job has left the queue (started, finished, failed, canceled:
read from the job's RQ status at the next admission), when its job record has expired, or when an
upload that never became a job passes its deadline.
"""

from __future__ import annotations

import hashlib
import time

from redis import Redis
from rq.job import Job

from service.errors import RETRY_AFTER_S, ApiError
from worker.queueing import default_model_name, model_queue_key, model_slots_key
from worker.settings import Settings

PENDING = "pending:"  # idempotency value while the job's upload is being received

# KEYS: inflight zset, idempotency key (or ""), the model's queue list, the model's queued-slot zset.
# ARGV: job id, now (ms), reservation deadline (ms), max in flight, max queued, zset TTL (s),
#       idempotency TTL (s), RQ job key prefix.
# Returns {"existing", id} | {"in_progress"} | {"queue_full"} | {"too_many"} | {"admitted"}.
ADMIT_LUA = """
local function terminal(status)
  return status == 'finished' or status == 'failed' or status == 'canceled' or status == 'stopped'
end
local function waiting(status)
  return status == 'queued' or status == 'deferred' or status == 'scheduled'
end
local idem = KEYS[2]
if idem ~= '' then
  local held = redis.call('GET', idem)
  if held then
    if string.sub(held, 1, 8) == 'pending:' then return {'in_progress'} end
    if redis.call('EXISTS', ARGV[8] .. held) == 1 then return {'existing', held} end
  end
end
local now = tonumber(ARGV[2])
local queued = 0
local held = redis.call('ZRANGE', KEYS[4], 0, -1, 'WITHSCORES')
for i = 1, #held, 2 do
  local status = redis.call('HGET', ARGV[8] .. held[i], 'status')
  if (status and waiting(status)) or (not status and tonumber(held[i + 1]) >= now) then
    queued = queued + 1
  else
    redis.call('ZREM', KEYS[4], held[i])
  end
end
if queued >= tonumber(ARGV[5]) or redis.call('LLEN', KEYS[3]) >= tonumber(ARGV[5]) then return {'queue_full'} end
local live = 0
local slots = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #slots, 2 do
  local status = redis.call('HGET', ARGV[8] .. slots[i], 'status')
  if (status and terminal(status)) or (not status and tonumber(slots[i + 1]) < now) then
    redis.call('ZREM', KEYS[1], slots[i])
  else
    live = live + 1
  end
end
if live >= tonumber(ARGV[4]) then return {'too_many'} end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
redis.call('EXPIRE', KEYS[4], ARGV[6])
if idem ~= '' then redis.call('SET', idem, 'pending:' .. ARGV[1], 'EX', ARGV[7]) end
return {'admitted'}
"""

# KEYS: inflight zset, idempotency key (or ""), the model's queued-slot zset. ARGV: job id. Frees
# both slots, and the Idempotency-Key only while it is still this request's pending reservation.
RELEASE_LUA = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if KEYS[2] ~= '' and redis.call('GET', KEYS[2]) == 'pending:' .. ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
"""


def inflight_key(settings: Settings, owner: str) -> str:
    return settings.key("inflight_jobs", owner)


def idempotency_key(settings: Settings, owner: str, client_key: str) -> str:
    return settings.key("idem", owner, hashlib.sha256(client_key.encode()).hexdigest())


def _queue_keys(settings: Settings, model: str | None) -> tuple[str, str]:
    """(queue list, queued-slot zset) of a model; ``None``: the default model's."""
    if model is None:
        model = default_model_name(settings) or ""
    return model_queue_key(settings, model), model_slots_key(settings, model)


def admit(
    connection: Redis, settings: Settings, owner: str, job_id: str, client_key: str | None, model: str | None = None
) -> str | None:
    """Reserve an in-flight slot of ``owner`` and a queue slot of ``model`` for ``job_id``; returns the
    earlier job's id when the Idempotency-Key was used.

    Raises 409 (same Idempotency-Key still uploading), 503 (the model's queue is full) or 429 (too
    many in flight).
    """
    now_ms = int(time.time() * 1000)
    keys = [
        inflight_key(settings, owner),
        idempotency_key(settings, owner, client_key) if client_key else "",
        *_queue_keys(settings, model),
    ]
    args = [
        job_id,
        now_ms,
        now_ms + int(settings.upload_reservation_s * 1000),
        settings.max_inflight_per_key,
        settings.max_queued,
        settings.result_ttl_s,
        settings.idempotency_ttl_s,
        Job.redis_job_namespace_prefix,
    ]
    outcome, *rest = (part.decode() for part in connection.register_script(ADMIT_LUA)(keys=keys, args=args))
    if outcome == "admitted":
        return None
    if outcome == "existing":
        return rest[0]
    if outcome == "in_progress":
        raise ApiError(409, "idempotency_in_progress", "a request with this Idempotency-Key is still being processed")
    if outcome == "queue_full":
        raise ApiError(
            503,
            "queue_full",
            f"the queue of model {model} is full; retry later" if model else "the queue is full; retry later",
            reason="queue_full",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    raise ApiError(
        429,
        "too_many_jobs",
        f"at most {settings.max_inflight_per_key} jobs in flight per key",
        reason="rate_limited",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def release(
    connection: Redis, settings: Settings, owner: str, job_id: str, client_key: str | None, model: str | None = None
) -> None:
    """Undo ``admit`` for a request that did not enqueue its job (refused upload, error, disconnect)."""
    keys = [
        inflight_key(settings, owner),
        idempotency_key(settings, owner, client_key) if client_key else "",
        _queue_keys(settings, model)[1],
    ]
    connection.register_script(RELEASE_LUA)(keys=keys, args=[job_id])


def complete_idempotency(connection: Redis, settings: Settings, owner: str, client_key: str, job_id: str) -> None:
    """The job is enqueued: later requests with this Idempotency-Key get it back."""
    connection.set(idempotency_key(settings, owner, client_key), job_id, ex=settings.idempotency_ttl_s)
