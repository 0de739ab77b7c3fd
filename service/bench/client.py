"""The benches' HTTP client: a job submitted and polled to its end, a closed loop of concurrent clients,
and the thread fan-out and percentiles their summaries use (``bench service``, ``throughput``, ``load``).

One client so that every bench measures a job the same way: the end-to-end time runs from the
upload to the poll that sees the job end, and the worker's own ``timings_ms`` come from the result.
Only httpx, no torch: the benches drive a service, they do not run the model.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

TERMINAL = ("finished", "failed", "canceled")


def bearer(api_key: str | None) -> dict[str, str]:
    """The request headers for ``--api-key`` (none without one)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (``q`` in [0, 1]); NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q
    low, high = int(position), min(int(position) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def submit(client, video: bytes, params: dict, name: str = "bench.mp4"):
    """``POST /classify`` of one video; the response as it came (the caller decides what a 503 means)."""
    return client.post("/classify", params=params, files={"file": (name, video, "video/mp4")})


def run_job(client, video: bytes, params: dict, poll_s: float) -> dict:
    """Submit one job and poll it to its end: its end-to-end and in-worker times and its result.
    Raises on a rejected upload or a job that did not finish."""
    start = time.perf_counter()
    response = submit(client, video, params)
    response.raise_for_status()
    job_id = response.json()["job_id"]
    while True:
        body = client.get(f"/jobs/{job_id}").json()
        if body["status"] in TERMINAL:
            break
        time.sleep(poll_s)
    end_to_end = (time.perf_counter() - start) * 1000
    if body["status"] != "finished":
        raise RuntimeError(f"job {job_id} ended {body['status']}: {body.get('error')}")
    timings = body["result"]["timings_ms"]
    return {
        "e2e_ms": end_to_end,
        "compute_ms": timings["total"],
        "queue_ms": timings.get("queue", 0.0),
        "result": body["result"],
    }


def run_threads(target: Callable[[], None], count: int) -> float:
    """``count`` threads on ``target``, started together and joined; the wall time in seconds."""
    threads = [threading.Thread(target=target, daemon=True) for _ in range(count)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def closed_loop(
    base: str, headers: dict, video: bytes, params: dict, clients: int, jobs: int, poll_s: float
) -> tuple[list[dict], float]:
    """``jobs`` jobs by ``clients`` clients, each submitting its next job when its last one ended:
    (one ``run_job`` sample per job with its start and end, wall s). The first failure stops every
    client and is raised as a ``UserError``."""
    import httpx

    lock = threading.Lock()
    remaining = [jobs]
    samples: list[dict] = []
    errors: list[BaseException] = []

    def client_loop() -> None:
        with httpx.Client(base_url=base, timeout=600, headers=headers) as client:
            while True:
                with lock:
                    if remaining[0] <= 0 or errors:
                        return
                    remaining[0] -= 1
                started = time.perf_counter()
                try:
                    sample = run_job(client, video, params, poll_s)
                except BaseException as exc:  # noqa: BLE001 - reported after the run
                    errors.append(exc)
                    return
                with lock:
                    samples.append({**sample, "start": started, "end": time.perf_counter()})

    wall_s = run_threads(client_loop, clients)
    if errors:
        from models.errors import UserError

        raise UserError(f"a benchmark job failed: {errors[0]}")
    return samples, wall_s
