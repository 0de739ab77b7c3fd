"""Docker HEALTHCHECK of a worker container: is a worker of this host alive in Redis?

A worker keeps ``<prefix>:worker:<hostname>.<pid>.<random>`` alive with a heartbeat (TTL
MOTIONGUARD_HEARTBEAT_TTL_S); inside a container the hostname is the container's, so the key exists
exactly while this container's worker is up, beating and connected to Redis.  Exit 0 healthy, 1 not.
"""

from __future__ import annotations

import socket
import sys


def main() -> int:
    import redis

    from worker.settings import Settings

    settings = Settings()
    if not settings.redis_url:
        print("MOTIONGUARD_REDIS_URL is not set", file=sys.stderr)
        return 1
    try:
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=3, socket_connect_timeout=3)
        pattern = settings.key("worker", f"{socket.gethostname()}.*")
        alive = any(True for _ in client.scan_iter(match=pattern, count=500))
    except redis.RedisError as exc:
        print(f"redis: {exc}", file=sys.stderr)
        return 1
    if not alive:
        print(f"no live worker heartbeat matching {pattern}", file=sys.stderr)
    return 0 if alive else 1


if __name__ == "__main__":
    sys.exit(main())
