"""Several models in one deployment (issue 25): the model repository (``worker.repository``), jobs
pinned to a bundle by name, version and sha256 (``worker.serving.routing``, ``worker.recovery``),
``GET /models``, ``POST /classify?model=``, one ``serve`` for two models, and a rolling upgrade with
two real worker processes on the real Redis. The burst test of the per-model queue cap is in
``tests/test_admission.py``."""

from __future__ import annotations

import hashlib
import shutil
import uuid
from pathlib import Path

import pytest
from redis import Redis
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.serializers import JSONSerializer

from models.bundle_meta import read_bundle_meta, write_bundle_meta
from worker.queueing import JOB_FUNCTION, model_queue, pinned_queue, pinned_queue_name
from worker.recovery import MODEL_UNAVAILABLE, fail_unserved
from worker.repository import ModelNotFound, ModelNotServed, Repository, bundle_digest, version_key
from worker.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]


def copy_bundle(source: Path, dest: Path, name: str, version: str) -> Path:
    """The same weights under another name/version: a bundle of its own (its bundle.json differs)."""
    shutil.copytree(source, dest)
    meta = read_bundle_meta(dest)
    write_bundle_meta(dest, meta.model_copy(update={"name": name, "version": version}))
    return dest


@pytest.fixture(scope="module")
def repository_dir(random_bundle, tmp_path_factory) -> Path:
    """alpha 1, alpha 2 and beta 1 (the tiny random bundle's weights), and one broken directory."""
    root = tmp_path_factory.mktemp("repository")
    copy_bundle(random_bundle, root / "alpha-1", "alpha", "1")
    copy_bundle(random_bundle, root / "alpha-2", "alpha", "2")
    copy_bundle(random_bundle, root / "beta-1", "beta", "1")
    (root / "broken").mkdir()
    (root / "broken" / "bundle.json").write_text("{not json")
    return root


# --- the repository, no Redis --------------------------------------------------------------------


def test_repository_names_every_bundle_by_its_json(repository_dir):
    settings = Settings(model_repository=repository_dir, bundle_dir=repository_dir / "beta-1")
    repo = Repository.scan(settings)
    assert [(e.name, e.version) for e in repo.entries] == [("alpha", "1"), ("alpha", "2"), ("beta", "1")]
    for entry in repo.entries:  # the digest is the sha256 of bundle.json's bytes
        assert entry.sha256 == hashlib.sha256((entry.path / "bundle.json").read_bytes()).hexdigest()
        assert entry.sha256 == bundle_digest(entry.path)
    assert len({e.sha256 for e in repo.entries}) == 3  # same weights, other name or version: other bundle
    assert repo.default.name == "beta"
    assert repo.resolve().name == "beta"  # no model named: the default
    assert repo.resolve("alpha").version == "2"  # no version: the highest
    assert repo.resolve("alpha", "1").path == (repository_dir / "alpha-1").resolve()
    with pytest.raises(ModelNotFound):
        repo.resolve("alpha", "3")
    with pytest.raises(ModelNotFound):
        repo.resolve("gamma")


def test_served_models_and_the_single_bundle_default(repository_dir, random_bundle):
    settings = Settings(model_repository=repository_dir, bundle_dir=repository_dir / "beta-1", models=["alpha:1"])
    repo = Repository.scan(settings)
    assert [(e.name, e.version) for e in repo.served] == [("alpha", "1")]
    assert repo.resolve("alpha").version == "1"  # the served version, not the highest
    with pytest.raises(ModelNotServed):
        repo.resolve("beta")
    assert repo.resolve("alpha", "2", served_only=False).version == "2"
    # A deployment that names only its bundle directory serves that bundle alone, as before.
    single = Repository.scan(Settings(bundle_dir=random_bundle))
    assert [e.path for e in single.entries] == [random_bundle.resolve()]
    # The shipped default: the whole shipped repository.
    shipped = Repository.scan(Settings())
    assert shipped.default is not None and shipped.default in shipped.entries
    assert {e.path.parent for e in shipped.entries} == {(REPO_ROOT / "models" / "bundles").resolve()}


def test_version_order_is_natural():
    assert sorted(["1.10", "1.9", "2", "1.9.1"], key=version_key) == ["1.9", "1.9.1", "1.10", "2"]


# --- routing and the unserved-job scan, real Redis ----------------------------------------------


@pytest.fixture
def redis_settings(redis_url, tmp_path):
    tag = uuid.uuid4().hex[:8]
    settings = Settings(redis_url=redis_url, queue_name=f"mdl-{tag}", key_prefix=f"mdl-{tag}", data_dir=tmp_path)
    connection = Redis.from_url(redis_url)
    yield settings, connection
    for key in connection.scan_iter(match=f"rq:queue:mdl-{tag}*"):
        connection.delete(key)
        connection.srem("rq:queues", key)


def _ref(name: str, version: str, digest: str) -> dict:
    return {"name": name, "version": version, "sha256": digest}


def test_a_job_for_another_bundle_moves_to_its_pinned_queue(redis_settings):
    from worker.serving.routing import accept

    settings, connection = redis_settings
    old, new = _ref("alpha", "1", "a" * 64), _ref("alpha", "2", "b" * 64)
    queue = model_queue(connection, settings, "alpha")
    job = queue.enqueue(JOB_FUNCTION, {}, job_id=uuid.uuid4().hex, meta={"model": old})
    legacy = queue.enqueue(JOB_FUNCTION, {}, job_id=uuid.uuid4().hex, meta={})
    taken, from_queue = Queue.dequeue_any([queue], None, connection=connection, serializer=JSONSerializer)
    assert taken.id == job.id
    assert accept(connection, settings, old, taken, from_queue)  # its own bundle: runs here
    assert not accept(connection, settings, new, taken, from_queue)  # another version: never run here
    moved = Job.fetch(job.id, connection=connection, serializer=JSONSerializer)
    assert moved.origin == pinned_queue_name(settings, "alpha", old["sha256"]) and moved.meta["reroutes"] == 1
    assert moved.get_status() == JobStatus.QUEUED
    assert pinned_queue(connection, settings, "alpha", old["sha256"]).job_ids == [job.id]
    assert queue.job_ids == [legacy.id]
    # Same name and version, other weights: not the same bundle either.
    assert not accept(connection, settings, _ref("alpha", "1", "c" * 64), moved, from_queue)
    # A job queued without a model (tools, before models existed) runs on the worker that takes it.
    assert accept(connection, settings, new, legacy, queue)


def test_a_pinned_job_no_live_worker_can_run_fails_clearly(redis_settings):
    settings, connection = redis_settings
    settings = settings.model_copy(update={"model_wait_s": 0.0})
    ref = _ref("alpha", "1", "d" * 64)
    queue = pinned_queue(connection, settings, "alpha", ref["sha256"])
    job = queue.enqueue(JOB_FUNCTION, {}, job_id=uuid.uuid4().hex, meta={"model": ref})
    other = [{"name": "w1", "bundle": "alpha", "version": "2", "sha256": "e" * 64}]
    assert fail_unserved(connection, settings, [*other, {"name": "w2", "bundle": "alpha", **ref}]) == []
    assert fail_unserved(connection, settings.model_copy(update={"model_wait_s": 3600}), other) == []
    assert fail_unserved(connection, settings, other) == [job.id]
    failed = Job.fetch(job.id, connection=connection, serializer=JSONSerializer)
    assert failed.get_status() == JobStatus.FAILED and queue.job_ids == []
    assert failed.meta["error"]["code"] == MODEL_UNAVAILABLE
    assert "alpha version 1" in failed.meta["error"]["message"] and "dddddddddddd" in failed.meta["error"]["message"]
