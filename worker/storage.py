"""Where jobs leave their output: result JSON in Redis (with a TTL) and restored videos as blobs.

Torch-free: the API serves what the workers store. Blob names are fixed by the service
("restored.mp4", ...) and job ids are validated hex, so no client text ever becomes a path.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Protocol

from redis import Redis

from worker.settings import Settings

log = logging.getLogger(__name__)

JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")
RESTORED_FORMATS: dict[str, tuple[str, str]] = {
    # format -> (blob name, media type)
    "mp4": ("restored.mp4", "video/mp4"),
    "ffv1": ("restored.mkv", "video/x-matroska"),
    "npz": ("restored.npz", "application/octet-stream"),
}
# Pictures of a defended clip (worker.serving.figures), served at /jobs/{id}/clips/{index}/{name}
FIGURE_URL_KEYS: dict[str, str] = {"flow.png": "flow_url", "mc_loss.png": "mc_loss_url"}


def figure_blob_name(index: int, name: str) -> str:
    if name not in FIGURE_URL_KEYS or not isinstance(index, int) or index < 0:
        raise ValueError(f"not a figure: {index!r} {name!r}")
    return f"clip{index}.{name}"


def check_job_id(job_id: str) -> str:
    if not JOB_ID_RE.fullmatch(job_id):
        raise ValueError(f"not a job id: {job_id!r}")
    return job_id


class BlobStore(Protocol):
    def put(self, job_id: str, name: str, data: bytes) -> None: ...
    def get(self, job_id: str, name: str) -> bytes | None: ...
    def delete(self, job_id: str) -> None: ...


class DirBlobStore:
    """One directory per job under ``root`` (a volume shared by the API and the workers)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _dir(self, job_id: str) -> Path:
        return self.root / check_job_id(job_id)

    def put(self, job_id: str, name: str, data: bytes) -> None:
        folder = self._dir(job_id)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(folder / name)  # readers never see a half-written file

    def get(self, job_id: str, name: str) -> bytes | None:
        path = self._dir(job_id) / name
        return path.read_bytes() if path.is_file() else None

    def delete(self, job_id: str) -> None:
        shutil.rmtree(self._dir(job_id), ignore_errors=True)

    def job_ids(self) -> list[str]:
        """The jobs that have a blob folder (anything else under ``root`` is not ours: left alone)."""
        if not self.root.is_dir():
            return []
        return [p.name for p in self.root.iterdir() if p.is_dir() and JOB_ID_RE.fullmatch(p.name)]


class RedisBlobStore:
    """Blobs as Redis strings with the result's TTL: no shared volume needed, bounded by Redis memory."""

    def __init__(self, connection: Redis, settings: Settings):
        self.connection, self.settings = connection, settings

    def _key(self, job_id: str, name: str) -> str:
        return self.settings.key("blob", check_job_id(job_id), name)

    def put(self, job_id: str, name: str, data: bytes) -> None:
        self.connection.set(self._key(job_id, name), data, ex=self.settings.result_ttl_s)

    def get(self, job_id: str, name: str) -> bytes | None:
        return self.connection.get(self._key(job_id, name))

    def delete(self, job_id: str) -> None:
        keys = list(self.connection.scan_iter(match=self._key(job_id, "*"), count=500))  # restored + figures
        if keys:
            self.connection.delete(*keys)


def blob_store(settings: Settings, connection: Redis) -> BlobStore:
    if settings.blob_store == "redis":
        return RedisBlobStore(connection, settings)
    return DirBlobStore(settings.blob_dir)


def result_key(settings: Settings, job_id: str) -> str:
    return settings.key("result", check_job_id(job_id))


def save_result(connection: Redis, settings: Settings, job_id: str, result: dict[str, Any]) -> None:
    connection.set(result_key(settings, job_id), json.dumps(result), ex=settings.result_ttl_s)


def load_result(connection: Redis, settings: Settings, job_id: str) -> dict[str, Any] | None:
    raw = connection.get(result_key(settings, job_id))
    return json.loads(raw) if raw else None


def delete_result(connection: Redis, settings: Settings, job_id: str) -> None:
    connection.delete(result_key(settings, job_id))


def upload_path(settings: Settings, job_id: str) -> Path:
    """The stored upload of a job: named by the job id, never by the client's filename."""
    return settings.upload_dir / f"{check_job_id(job_id)}.upload"


def stored_uploads(settings: Settings) -> dict[str, Path]:
    """Job id -> upload file, for every upload on this host's disk."""
    if not settings.upload_dir.is_dir():
        return {}
    found = {p.name.removesuffix(".upload"): p for p in settings.upload_dir.glob("*.upload")}
    return {job_id: path for job_id, path in found.items() if JOB_ID_RE.fullmatch(job_id)}


# In "redis" blob mode uploads travel through Redis too, so workers on other hosts need no shared
# disk: the API stashes the probed upload, a worker fetches it into its own upload directory.


def upload_key(settings: Settings, job_id: str) -> str:
    return settings.key("upload", check_job_id(job_id))


def stash_upload(connection: Redis, settings: Settings, job_id: str) -> None:
    if settings.blob_store != "redis":
        return
    path = upload_path(settings, job_id)
    connection.set(upload_key(settings, job_id), path.read_bytes(), ex=settings.result_ttl_s)
    path.unlink(missing_ok=True)


def fetch_upload(connection: Redis, settings: Settings, job_id: str) -> Path:
    """The local path of a job's upload, fetched from Redis first when it travels that way."""
    path = upload_path(settings, job_id)
    if path.is_file() or settings.blob_store != "redis":
        return path
    data = connection.get(upload_key(settings, job_id))
    if data is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path


def upload_exists(connection: Redis, settings: Settings, job_id: str) -> bool:
    if upload_path(settings, job_id).is_file():
        return True
    return settings.blob_store == "redis" and bool(connection.exists(upload_key(settings, job_id)))


def discard_upload(connection: Redis, settings: Settings, job_id: str) -> None:
    upload_path(settings, job_id).unlink(missing_ok=True)
    if settings.blob_store == "redis":
        connection.delete(upload_key(settings, job_id))
