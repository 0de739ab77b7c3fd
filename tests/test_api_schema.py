"""schemathesis against the API's own OpenAPI schema (issue 8): every operation, called with a valid
API key and with none, answers no 5xx and conforms to the schema (status code documented, content
type, headers, body against its response schema).

The app runs in-process under uvicorn (real HTTP) with a real Redis and API keys configured; no
workers are needed (uploads that pass the probe just wait in a private queue, emptied afterwards).
The example count is bounded so the whole module takes well under two minutes on a busy CI box.
"""

from __future__ import annotations

import json
import uuid

import pytest
import schemathesis
from conftest import LiveServer, settings_from_env
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.integration

MAX_EXAMPLES = 25  # per operation; each example is sent twice (with and without a key)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
KEY = {"Authorization": "Bearer key-alice"}


def _openapi() -> dict:
    """The schema the app serves at /openapi.json (building it needs no Redis and no lifespan)."""
    from service.app import create_app
    from worker.settings import Settings

    return create_app(Settings()).openapi()


schema = schemathesis.openapi.from_dict(_openapi())


@pytest.fixture(scope="module")
def api_url(service_env, tmp_path_factory):
    from redis import Redis

    from models.bundle_meta import read_bundle_meta
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


def test_schema_is_the_served_one(api_url):
    import httpx

    assert httpx.get(f"{api_url}/openapi.json").json() == _openapi()


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_its_schema(case, api_url):
    for headers in (KEY, {"Authorization": ""}):
        case.call_and_validate(base_url=api_url, headers=headers, checks=CHECKS)
