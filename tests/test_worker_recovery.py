"""worker.recovery against a real Redis: a started job whose heartbeat expired is requeued once,
then failed with reason ``worker_died``; live or ended jobs are left alone."""

from __future__ import annotations

import time
import uuid

import pytest
from redis import Redis
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from worker.queueing import make_queue
from worker.recovery import recover_dead_jobs
from worker.settings import Settings
from worker.storage import upload_path

pytestmark = pytest.mark.integration


@pytest.fixture
def setup(redis_url, tmp_path):
    tag = uuid.uuid4().hex[:8]
    settings = Settings(
        redis_url=redis_url, queue_name=f"rec-{tag}", key_prefix=f"rec-{tag}", data_dir=tmp_path, max_retries=1
    )
    connection = Redis.from_url(redis_url)
    queue = make_queue(connection, settings)
    yield settings, connection, queue
    queue.empty()


def _start(connection, queue, job: Job, expires_in: float) -> None:
    """What a worker does when it takes the job, with a heartbeat that expires at now + expires_in."""
    queue.remove(job.id)
    job.set_status(JobStatus.STARTED)
    connection.zadd(queue.started_job_registry.key, {f"{job.id}:exec-{uuid.uuid4().hex[:6]}": time.time() + expires_in})


def test_dead_worker_job_requeued_then_failed(setup):
    settings, connection, queue = setup
    job_id = uuid.uuid4().hex
    upload_path(settings, job_id).parent.mkdir(parents=True, exist_ok=True)
    upload_path(settings, job_id).write_bytes(b"video")
    job = queue.enqueue("worker.serving.jobs.analyse_job", {"defend": True}, job_id=job_id, meta={"worker": "w1"})

    _start(connection, queue, job, expires_in=60)
    assert recover_dead_jobs(connection, settings) == []  # heartbeat still fresh

    connection.zremrangebyscore(queue.started_job_registry.key, 0, "+inf")
    _start(connection, queue, job, expires_in=-1)
    assert recover_dead_jobs(connection, settings) == [(job_id, "requeued")]
    job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.QUEUED and job_id in queue.job_ids
    assert job.meta["worker_deaths"] == 1

    _start(connection, queue, job, expires_in=-1)
    assert recover_dead_jobs(connection, settings) == [(job_id, "failed")]
    job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.FAILED
    assert job.meta["error"]["code"] == "worker_died"
    assert not upload_path(settings, job_id).exists()
    assert connection.zcard(queue.started_job_registry.key) == 0


def test_finished_job_with_stale_entry_is_left_alone(setup):
    settings, connection, queue = setup
    job = queue.enqueue("worker.serving.jobs.analyse_job", {}, job_id=uuid.uuid4().hex)
    _start(connection, queue, job, expires_in=-1)
    job.set_status(JobStatus.FINISHED)
    assert recover_dead_jobs(connection, settings) == []
    assert connection.zcard(queue.started_job_registry.key) == 0


def test_a_starting_worker_requeues_a_dead_workers_job_before_rqs_cleanup_fails_it(setup):
    """A worker started more than a heartbeat TTL after a crash runs RQ's registry maintenance first
    thing; RQ's started-registry cleanup would fail the dead worker's job (``AbandonedJobError``).
    The worker's ``clean_registries`` runs the recovery first, so the job is requeued (as in CI's
    embedded-persistence crash, where a restart took 3.4 s against a 3 s TTL)."""
    from rq.registry import FailedJobRegistry

    from worker.serving.routing import RoutedWorker

    settings, connection, queue = setup
    job_id = uuid.uuid4().hex
    upload_path(settings, job_id).parent.mkdir(parents=True, exist_ok=True)
    upload_path(settings, job_id).write_bytes(b"video")
    job = queue.enqueue("worker.serving.jobs.analyse_job", {"defend": True}, job_id=job_id, meta={"worker": "w1"})
    _start(connection, queue, job, expires_in=-1)
    worker = RoutedWorker([queue], connection=connection, serializer=JSONSerializer, name=f"w2-{job_id[:6]}")
    worker.settings = settings
    worker.clean_registries()
    job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.QUEUED and job_id in queue.job_ids, job.get_status()
    assert job.meta["worker_deaths"] == 1
    assert job_id not in FailedJobRegistry(queue.name, connection=connection, serializer=JSONSerializer)
    assert connection.zcard(queue.started_job_registry.key) == 0
