"""schemathesis against the API's own OpenAPI schema (issues 8 and 19), in both modes the server
runs in: with API keys configured and without. Every check schemathesis has runs (no 5xx, status
codes, content types, headers and bodies as documented, schema-valid data accepted and invalid data
rejected, Allow headers, authentication really enforced where declared, and the stateful checks on
the links from POST /classify to the job routes), through the pytest integration and through the
CLI (``schemathesis run --checks all``, every phase, stateful included), as an outside user runs it.

The app runs in-process under uvicorn (real HTTP) with a real Redis; no workers are needed (uploads
that pass the probe just wait in a private queue, emptied afterwards). The repository's
``schemathesis.toml`` says the one thing no schema can: that a schema-valid upload which is not a
decodable video is rightly refused (415). Example counts are bounded so the module stays fast.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import schemathesis
from conftest import LiveServer, settings_from_env
from hypothesis import HealthCheck, Phase, settings
from schemathesis.config import SchemathesisConfig

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
MAX_EXAMPLES = 25  # per operation; each example is sent twice (with and without a key)
CLI_MAX_EXAMPLES = 15
KEYS = ["key-alice", "key-bob"]
KEY = {"Authorization": "Bearer key-alice"}
CONFIG = SchemathesisConfig.from_path(ROOT / "schemathesis.toml")


def _openapi(keys: list[str]) -> dict:
    """The schema an app with these keys serves at /openapi.json (no Redis, no lifespan needed)."""
    from service.app import create_app
    from worker.settings import Settings

    return create_app(Settings(api_keys=keys)).openapi()


schema = schemathesis.openapi.from_dict(_openapi(KEYS), config=CONFIG)


def _serve(service_env, tmp_path_factory, keys: list[str]):
    from redis import Redis

    from models.bundle_meta import SERVED_BUNDLE_DIR, read_bundle_meta
    from service.app import create_app
    from worker.queueing import make_queue

    tag = uuid.uuid4().hex[:8]
    app_settings = settings_from_env(
        service_env,
        queue_name=f"schema-{tag}",
        key_prefix=f"schema-{tag}",
        data_dir=str(tmp_path_factory.mktemp("schema-data")),
        max_queued=10_000,
        max_inflight_per_key=10_000,
        api_keys=keys,
        bundle_dir=str(SERVED_BUNDLE_DIR),  # the default deployment's (calibrated: defend=auto served); JSON only
    )
    connection = Redis.from_url(app_settings.redis_url)
    # A worker's liveness record (what a real worker publishes) so /readyz is 200, not its 503.
    meta = read_bundle_meta(app_settings.bundle_dir)
    liveness = app_settings.key("worker", "schema-test")
    connection.set(liveness, json.dumps({"bundle": meta.name, "version": meta.version, "device": "cpu"}), ex=600)
    try:
        with LiveServer(create_app(app_settings, run_recovery=False)) as server:
            yield server.url
    finally:
        connection.delete(liveness)
        make_queue(connection, app_settings).empty()


@pytest.fixture(scope="module")
def api_url(service_env, tmp_path_factory):
    """The API with keys configured."""
    yield from _serve(service_env, tmp_path_factory, KEYS)


@pytest.fixture(scope="module")
def open_api_url(service_env, tmp_path_factory):
    """The API without keys: every route open."""
    yield from _serve(service_env, tmp_path_factory, [])


def test_schema_is_the_served_one(api_url, open_api_url):
    import httpx

    assert httpx.get(f"{api_url}/openapi.json").json() == _openapi(KEYS)
    assert httpx.get(f"{open_api_url}/openapi.json").json() == _openapi([])


def test_security_is_declared_only_when_keys_are_configured():
    keyed, open_ = _openapi(KEYS), _openapi([])
    models_keyed, models_open = keyed["paths"]["/models"]["get"], open_["paths"]["/models"]["get"]
    assert models_keyed["security"] == [{"HTTPBearer": []}] and "401" in models_keyed["responses"]
    assert "security" not in models_open and "401" not in models_open["responses"]
    assert "securitySchemes" not in open_["components"] and "HTTPBearer" in keyed["components"]["securitySchemes"]
    for operations in open_["paths"].values():
        assert all("security" not in op and "401" not in op["responses"] for op in operations.values())


def test_enforced_bounds_are_declared(random_bundle):
    """The bounds the handler enforces from settings are in the schema, with the settings' values."""
    from service.app import create_app
    from worker.settings import Settings

    doc = create_app(Settings(max_top_k=7, max_steps=30, max_epsilon=0.1)).openapi()
    params = {p["name"]: p["schema"]["anyOf"][0] for p in doc["paths"]["/classify"]["post"]["parameters"]}
    assert params["top_k"]["maximum"] == 7 and params["top_k"]["minimum"] == 1
    assert params["steps"]["maximum"] == 30 and params["steps"]["minimum"] == 0
    assert params["epsilon"]["maximum"] == 0.1 and params["epsilon"]["exclusiveMinimum"] == 0
    from models.defense_mode import parse_mode

    assert {parse_mode(v) for v in params["defend"]["enum"]} == {"always", "off", "auto"}  # shipped: calibrated
    uncalibrated = create_app(Settings(bundle_dir=random_bundle)).openapi()["paths"]["/classify"]["post"]
    defend = next(p["schema"]["anyOf"][0] for p in uncalibrated["parameters"] if p["name"] == "defend")
    assert "auto" not in defend["enum"] and "true" in defend["enum"]  # no threshold: auto is a 422


def test_links_lead_from_classify_to_every_job_route():
    doc = _openapi(KEYS)
    links = doc["paths"]["/classify"]["post"]["responses"]["202"]["links"]
    operation_ids = {
        op["operationId"]: path
        for path, ops in doc["paths"].items()
        for op in ops.values()
        if path.startswith("/jobs/")
    }
    assert set(links) == set(operation_ids) and len(links) == 5  # GET, DELETE, restored, 2 figures
    for link in links.values():
        assert link["parameters"] == {"job_id": "$response.body#/job_id"}


def test_allow_lists_every_method_of_a_path(api_url):
    import httpx

    answer = httpx.options(f"{api_url}/jobs/abc", headers=KEY)
    assert answer.status_code == 405 and answer.headers["allow"] == "GET, DELETE"
    assert httpx.put(f"{api_url}/classify", headers=KEY).headers["allow"] == "POST"


def test_links_resolve_to_working_routes_for_a_real_job(api_url, tmp_path):
    """What a stateful client does with a real video (schemathesis cannot generate one): follow each
    link of the 202 and get a documented answer (200, or 409 while the job waits for a worker)."""
    import httpx
    from conftest import write_video

    doc = _openapi(KEYS)
    video = write_video(tmp_path / "v.mp4", count=8, height=64, width=64)
    with open(video, "rb") as handle:
        accepted = httpx.post(f"{api_url}/classify", headers=KEY, files={"file": ("v.mp4", handle, "video/mp4")})
    assert accepted.status_code == 202
    job_id = accepted.json()["job_id"]
    by_id = {op["operationId"]: (method, path) for path, ops in doc["paths"].items() for method, op in ops.items()}
    seen = {}
    for name in doc["paths"]["/classify"]["post"]["responses"]["202"]["links"]:
        method, path = by_id[name]
        if method == "delete":
            continue  # cancelling first would change what the others answer; done last
        url = api_url + path.replace("{job_id}", job_id).replace("{index}", "0")
        seen[path] = httpx.request(method.upper(), url, headers=KEY).status_code
    assert seen["/jobs/{job_id}"] == 200
    assert all(seen[p] == 409 for p in seen if p != "/jobs/{job_id}")  # queued: nothing to show yet
    assert httpx.delete(f"{api_url}/jobs/{job_id}", headers=KEY).status_code == 202


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_its_schema(case, api_url):
    """Every check (checks=None: all of schemathesis's, configured by schemathesis.toml)."""
    for headers in (KEY, {"Authorization": ""}):
        case.call_and_validate(base_url=api_url, headers=headers)


@pytest.mark.parametrize("mode", ["keys", "open"])
def test_schemathesis_cli_all_checks_all_phases(mode, api_url, open_api_url, tmp_path):
    """``schemathesis run --checks all`` with every phase (examples, coverage, fuzzing, stateful)
    against the served schema, with a key where keys are configured: 0 failures."""
    url = api_url if mode == "keys" else open_api_url
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "--config-file",
        str(ROOT / "schemathesis.toml"),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "all",
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-examples",
        str(CLI_MAX_EXAMPLES),
        "--workers",
        "1",
        "--seed",
        "19",
        "--suppress-health-check",
        "all",
    ]
    if mode == "keys":
        command += ["--header", f"Authorization: {KEY['Authorization']}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-6000:]
    assert "✅ Stateful" in done.stdout, done.stdout[-3000:]  # the phase ran (the links exist) and passed
