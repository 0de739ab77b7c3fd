"""worker.storage: both blob stores round-trip, results carry a TTL, and no client text becomes a path."""

from __future__ import annotations

import uuid

import pytest
from redis import Redis

from worker.settings import Settings
from worker.storage import DirBlobStore, RedisBlobStore, load_result, save_result, upload_path


@pytest.fixture
def settings(redis_url, tmp_path):
    tag = uuid.uuid4().hex[:8]
    return Settings(redis_url=redis_url, key_prefix=f"store-{tag}", data_dir=tmp_path, result_ttl_s=60)


@pytest.mark.parametrize("kind", ["dir", "redis"])
def test_blob_round_trip_and_delete(settings, kind):
    connection = Redis.from_url(settings.redis_url)
    store = DirBlobStore(settings.blob_dir) if kind == "dir" else RedisBlobStore(connection, settings)
    job_id = uuid.uuid4().hex
    store.put(job_id, "restored.mp4", b"\x00video")
    assert store.get(job_id, "restored.mp4") == b"\x00video"
    assert store.get(job_id, "restored.npz") is None
    store.delete(job_id)
    assert store.get(job_id, "restored.mp4") is None


@pytest.mark.parametrize("bad", ["../../etc/passwd", "A" * 32, "0" * 31, "", "0" * 32 + "/x"])
def test_job_ids_are_validated(settings, bad):
    with pytest.raises(ValueError):
        DirBlobStore(settings.blob_dir).put(bad, "restored.mp4", b"x")
    with pytest.raises(ValueError):
        upload_path(settings, bad)


def test_result_json_with_ttl(settings):
    connection = Redis.from_url(settings.redis_url)
    job_id = uuid.uuid4().hex
    save_result(connection, settings, job_id, {"labels": [1, 2]})
    assert load_result(connection, settings, job_id) == {"labels": [1, 2]}
    assert 0 < connection.ttl(settings.key("result", job_id)) <= 60


def test_uploads_travel_through_redis_in_redis_mode(settings, tmp_path):
    from worker.storage import discard_upload, fetch_upload, stash_upload, upload_exists

    connection = Redis.from_url(settings.redis_url)
    api_side = settings.model_copy(update={"blob_store": "redis"})
    worker_side = api_side.model_copy(update={"data_dir": tmp_path / "other-host"})
    job_id = uuid.uuid4().hex
    upload_path(api_side, job_id).parent.mkdir(parents=True, exist_ok=True)
    upload_path(api_side, job_id).write_bytes(b"video bytes")
    stash_upload(connection, api_side, job_id)
    assert not upload_path(api_side, job_id).exists()  # the API keeps no copy
    assert upload_exists(connection, worker_side, job_id)
    assert fetch_upload(connection, worker_side, job_id).read_bytes() == b"video bytes"
    discard_upload(connection, worker_side, job_id)
    assert not upload_exists(connection, worker_side, job_id)
