"""Several models in one deployment (issue 25): the model repository (``worker.repository``), jobs
pinned to a bundle by name, version and sha256 (``worker.serving.routing``, ``worker.recovery``),
``GET /models``, ``POST /classify?model=``, one ``serve`` for two models, and a rolling upgrade with
two real worker processes on the real Redis. The burst test of the per-model queue cap is in
``tests/test_admission.py``."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import ALICE, LiveServer, settings_from_env, wait_done, write_video
from redis import Redis
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.serializers import JSONSerializer
from test_web import browser  # noqa: F401 - the headless chromium fixture

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
    # The shipped default: the whole shipped repository, the robust bundle answering requests naming none.
    shipped = Repository.scan(Settings())
    assert shipped.default is not None and shipped.default in shipped.entries
    assert shipped.default.name == "motionshapes-robust"
    assert {e.path.parent for e in shipped.entries} == {(REPO_ROOT / "models" / "bundles").resolve()}
    # Another shipped bundle as the default changes the default, not the models served.
    v11 = Repository.scan(Settings(bundle_dir=REPO_ROOT / "models" / "bundles" / "motionshapes-v1"))
    assert v11.default is not None and v11.default.name == "motionshapes"
    assert {(e.name, e.version) for e in v11.entries} == {(e.name, e.version) for e in shipped.entries}
    assert len(shipped.entries) >= 2


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


# --- over HTTP, with real worker processes -------------------------------------------------------


def _env(service_env: dict, tmp_path: Path, repository: Path, default: Path, **extra: str) -> dict[str, str]:
    tag = uuid.uuid4().hex[:8]
    return {
        **service_env,
        "MOTIONGUARD_QUEUE_NAME": f"mdl-{tag}",
        "MOTIONGUARD_KEY_PREFIX": f"mdl-{tag}",
        "MOTIONGUARD_DATA_DIR": str(tmp_path / "data"),
        "MOTIONGUARD_MODEL_REPOSITORY": str(repository),
        "MOTIONGUARD_BUNDLE_DIR": str(default),
        **extra,
    }


def _submit(api: str, video: Path, **params) -> str:
    response = httpx.post(
        f"{api}/classify", params={"steps": 0, **params}, files={"file": ("v.mp4", video.read_bytes())}, headers=ALICE
    )
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def _until(condition, what: str, timeout: float = 120.0) -> None:
    """Poll ``condition`` until it holds; a condition that never holds is reported as a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not after {timeout} s"
        time.sleep(0.2)


def test_two_models_served_by_one_serve(service_env, repository_dir, tmp_path):
    """One ``serve --workers 1`` with a repository of two models starts a worker for each; a job for
    each model is answered by its own bundle (sha256 in the result = GET /models); an unknown model
    or version is a 404 and a model the deployment does not serve a 422, before anything is stored."""
    from helpers_serve import ServeProcess

    env = _env(service_env, tmp_path, repository_dir, repository_dir / "beta-1", MOTIONGUARD_MODELS="alpha:2,beta")
    video = write_video(tmp_path / "v.mp4", count=4, height=64, width=64)
    serve = ServeProcess(env, tmp_path / "serve.log", "--workers", "1")
    try:
        serve.start()
        models_url = f"{serve.url}/models"

        def workers_up() -> bool:
            served = [m for m in httpx.get(models_url, headers=ALICE).json()["models"] if m["served"]]
            return len(served) == 2 and all(len(m["workers"]) == 1 for m in served)

        _until(workers_up, "a live worker for each served model")
        listing = httpx.get(models_url, headers=ALICE).json()
        assert (listing["name"], listing["version"]) == ("beta", "1")  # the default model's fields at the top
        by_name = {(m["name"], m["version"]): m for m in listing["models"]}
        assert set(by_name) == {("alpha", "1"), ("alpha", "2"), ("beta", "1")}
        assert [k for k, m in by_name.items() if not m["served"]] == [("alpha", "1")]
        assert by_name[("alpha", "1")]["workers"] == [] and by_name[("beta", "1")]["default"]
        one = httpx.get(f"{models_url}/alpha", headers=ALICE).json()
        assert (one["version"], one["sha256"]) == ("2", by_name[("alpha", "2")]["sha256"])

        jobs = {("alpha", "2"): _submit(serve.url, video, model="alpha"), ("beta", "1"): _submit(serve.url, video)}
        for key, job_id in jobs.items():
            body = wait_done(serve.url, job_id)
            assert body["status"] == "finished", body
            assert body["result"]["model"] == {"name": key[0], "version": key[1], "sha256": by_name[key]["sha256"]}

        upload_dir = settings_from_env(env).upload_dir
        stored = sorted(upload_dir.iterdir()) if upload_dir.is_dir() else []
        for params, status, code in (
            ({"model": "gamma"}, 404, "unknown_model"),
            ({"model": "alpha", "version": "9"}, 404, "unknown_model"),
            ({"model": "alpha", "version": "1"}, 422, "model_not_served"),
        ):
            response = httpx.post(
                f"{serve.url}/classify", params=params, files={"file": ("v.mp4", video.read_bytes())}, headers=ALICE
            )
            assert (response.status_code, response.json()["error"]["code"]) == (status, code), params
        assert (sorted(upload_dir.iterdir()) if upload_dir.is_dir() else []) == stored
        assert httpx.get(f"{models_url}/gamma", headers=ALICE).status_code == 404
    finally:
        if serve.proc and serve.proc.poll() is None:
            serve.stop()


class Worker:
    """One ``motionguard worker --model SPEC`` process."""

    def __init__(self, env: dict[str, str], spec: str, name: str, log_dir: Path):
        name = f"{env['MOTIONGUARD_KEY_PREFIX']}-{name}"  # RQ names are global to the Redis: one per test run
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        cmd = [sys.executable, "-m", "service.cli", "worker", "--model", spec, "--name", name]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # warm shutdown: a running job finishes first
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def stop_all(workers: list[Worker]) -> None:
    """Stop every worker, even when one of them does not stop in time (then raise)."""
    failures = []
    for worker in workers:
        try:
            worker.stop()
        except subprocess.TimeoutExpired as exc:
            failures.append(exc)
    if failures:
        raise failures[0]


def test_rolling_upgrade_loses_no_job_and_runs_none_on_the_wrong_bundle(service_env, random_bundle, tmp_path):
    """Two worker processes of model ``roll`` v1; one is restarted with v2 while v1 jobs are queued.
    The v2 worker takes the queued v1 jobs and runs none of them (each moves to v1's pinned queue);
    every v1 job then finishes on the v1 worker and every v2 job on the v2 worker: 0 lost, 0 run on
    the wrong bundle (the sha256 in each result and the worker recorded for each job say so)."""
    from service.app import create_app
    from worker.liveness import live_workers

    repository = tmp_path / "repository"
    old = copy_bundle(random_bundle, repository / "roll-1", "roll", "1")
    new = copy_bundle(random_bundle, repository / "roll-2", "roll", "2")
    env = _env(service_env, tmp_path, repository, old)
    settings = settings_from_env(env)
    connection = Redis.from_url(settings.redis_url)
    video = write_video(tmp_path / "v.mp4", count=4, height=64, width=64)
    digests = {"1": bundle_digest(old), "2": bundle_digest(new)}
    workers: list[Worker] = []

    def start(spec: str, name: str) -> Worker:
        worker = Worker(env, spec, name, tmp_path)
        workers.append(worker)
        live = lambda: worker.name in {w["name"] for w in live_workers(connection, settings)}  # noqa: E731
        _until(live, f"worker {worker.name} live")
        return worker

    def job(job_id: str) -> Job:
        return Job.fetch(job_id, connection=connection, serializer=JSONSerializer)

    try:
        with LiveServer(create_app(settings)) as api:
            a, b = start("roll:1", "w-a"), start("roll:1", "w-b")
            a2_name, b2_name = f"{settings.key_prefix}-w-a2", f"{settings.key_prefix}-w-b2"
            first = _submit(api.url, video)  # both serve v1: the default version
            assert wait_done(api.url, first)["result"]["model"]["sha256"] == digests["1"]
            a.stop()
            b.stop()
            v1_jobs = [_submit(api.url, video, model="roll", version="1") for _ in range(6)]
            assert all(job(j).get_status() == JobStatus.QUEUED for j in v1_jobs)

            start("roll:2", "w-b2")  # w-b restarted with the new version
            pinned = pinned_queue_name(settings, "roll", digests["1"])
            _until(lambda: all(job(j).origin == pinned for j in v1_jobs), "the v1 jobs moved to v1's pinned queue")
            assert all(job(j).get_status() == JobStatus.QUEUED and "worker" not in job(j).meta for j in v1_jobs)
            v2_jobs = [_submit(api.url, video, model="roll", version="2") for _ in range(3)]
            start("roll:1", "w-a2")  # a v1 worker again: the pinned jobs are its

            expected = [*((j, "1", a2_name) for j in v1_jobs), *((j, "2", b2_name) for j in v2_jobs)]
            for job_id, version, worker in expected:
                body = wait_done(api.url, job_id, timeout=180)
                assert body["status"] == "finished", body
                assert body["result"]["model"] == {"name": "roll", "version": version, "sha256": digests[version]}
                assert job(job_id).meta["worker"] == worker and job(job_id).meta["attempts"] == 1
    finally:
        stop_all(workers)


def test_classify_cli_names_the_bundle_that_answered(random_bundle, tmp_path, capsys):
    """``motionguard classify --bundle`` carries the bundle's name, version and sha256, as the service's results."""
    from service.cli import main

    video = write_video(tmp_path / "v.mp4", count=4, height=64, width=64)
    assert main(["classify", str(video), "--bundle", str(random_bundle), "--json", "--no-defend"]) == 0
    result = json.loads(capsys.readouterr().out)
    meta = read_bundle_meta(random_bundle)
    assert result["model"] == {"name": meta.name, "version": meta.version, "sha256": bundle_digest(random_bundle)}


def test_a_batching_worker_gathers_only_its_own_bundles_jobs(service_env, random_bundle, tmp_path):
    """A batching worker (max_batch_clips 8) of ``roll`` v2 finds [v2, v1, v2] jobs queued: it batches
    the two v2 jobs and moves the v1 job it gathered to v1's pinned queue without running it."""
    from service.app import create_app
    from worker.liveness import live_workers

    repository = tmp_path / "repository"
    old = copy_bundle(random_bundle, repository / "roll-1", "roll", "1")
    new = copy_bundle(random_bundle, repository / "roll-2", "roll", "2")
    env = _env(
        service_env, tmp_path, repository, old, MOTIONGUARD_MAX_BATCH_CLIPS="8", MOTIONGUARD_MAX_BATCH_DELAY_MS="2000"
    )
    settings = settings_from_env(env)
    connection = Redis.from_url(settings.redis_url)
    video = write_video(tmp_path / "v.mp4", count=4, height=64, width=64)
    worker = None
    try:
        with LiveServer(create_app(settings)) as api:
            ids = [_submit(api.url, video, model="roll", version=v) for v in ("2", "1", "2")]
            worker = Worker(env, "roll:2", "w-batch", tmp_path)
            _until(lambda: worker.name in {w["name"] for w in live_workers(connection, settings)}, "worker live")
            for job_id in (ids[0], ids[2]):
                body = wait_done(api.url, job_id, timeout=180)
                assert body["status"] == "finished", body
                assert body["result"]["model"]["sha256"] == bundle_digest(new)
                assert body["result"]["batch"]["jobs"] == 2  # the two v2 jobs, computed together
            v1 = Job.fetch(ids[1], connection=connection, serializer=JSONSerializer)
            assert v1.get_status() == JobStatus.QUEUED and "worker" not in v1.meta
            assert v1.origin == pinned_queue_name(settings, "roll", bundle_digest(old))
    finally:
        if worker is not None:
            worker.stop()


def test_a_bundle_added_to_the_repository_is_found_without_a_restart(service_env, random_bundle, tmp_path):
    """The API reads the repository at start; a request for a model it does not hold reads it again
    (at most every RESCAN_S), so a bundle copied in later is accepted without a restart."""
    from service.app import create_app

    repository = tmp_path / "repository"
    default = copy_bundle(random_bundle, repository / "roll-1", "roll", "1")
    env = _env(service_env, tmp_path, repository, default)
    video = write_video(tmp_path / "v.mp4", count=4, height=64, width=64)
    app = create_app(settings_from_env(env), run_recovery=False)
    with LiveServer(app) as api:
        late = {"model": "late"}
        post = lambda: httpx.post(  # noqa: E731
            f"{api.url}/classify", params=late, files={"file": ("v.mp4", video.read_bytes())}, headers=ALICE
        )
        assert post().status_code == 404
        copy_bundle(random_bundle, repository / "late-1", "late", "1")
        assert post().status_code == 404  # scanned a moment ago: not read again yet
        app.state.repository_scanned_at = 0.0  # as if RESCAN_S had passed
        accepted = post()
        assert accepted.status_code == 202, accepted.text
        names = {m["name"] for m in httpx.get(f"{api.url}/models", headers=ALICE).json()["models"]}
        assert names == {"roll", "late"}
    connection = Redis.from_url(settings_from_env(env).redis_url)
    model_queue(connection, settings_from_env(env), "late").empty()


@pytest.mark.integration
def test_the_web_page_picks_the_model_and_names_the_one_that_answered(
    service_env,
    repository_dir,
    browser,  # noqa: F811 - test_web's headless chromium fixture, imported above
    tmp_path,
):
    """In a real browser against ``serve`` with two served models: the Model select lists them (from
    GET /models), the chosen one runs the job, and the result names it with its sha256."""
    from helpers_serve import ServeProcess
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    from test_web import _submit as submit_in_page
    from test_web import _wait

    env = _env(service_env, tmp_path, repository_dir, repository_dir / "beta-1", MOTIONGUARD_MODELS="alpha:2,beta")
    env["MOTIONGUARD_API_KEYS"] = "key-alice"
    video = write_video(tmp_path / "v.mp4", count=4, height=64, width=64)
    serve = ServeProcess(env, tmp_path / "serve.log", "--workers", "1")
    try:
        serve.start()
        _until(
            lambda: all(
                m["workers"] for m in httpx.get(f"{serve.url}/models", headers=ALICE).json()["models"] if m["served"]
            ),
            "a worker for each served model",
        )
        alpha = httpx.get(f"{serve.url}/models/alpha", headers=ALICE).json()
        browser.get(serve.url + "/")
        browser.find_element(By.ID, "api-key").send_keys("key-alice\n")  # change event: the models load
        select = Select(browser.find_element(By.ID, "model"))
        _wait(browser, lambda d: len(select.options) == 3, 20, "the served models are not listed")
        assert [o.text for o in select.options] == ["Server default", "alpha v2", "beta v1 (default)"]
        select.select_by_visible_text("alpha v2")
        submit_in_page(browser, video)
        summary = browser.find_element(By.ID, "result-summary")
        _wait(browser, lambda d: summary.is_displayed() and summary.text, 120, "no result")
        assert f"Answered by model alpha v2 (sha256 {alpha['sha256'][:12]})" in summary.text, summary.text
    finally:
        if serve.proc and serve.proc.poll() is None:
            serve.stop()
