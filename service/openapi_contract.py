"""The served OpenAPI schema, made to say exactly what this server, with its settings, does.

FastAPI builds the schema from the route declarations alone, which cannot know the deployment: it
declares the bearer-key security on every key-checked route even when no keys are configured (the
server then answers 200 without one), and the bounds that come from settings (``max_top_k``,
``max_steps``, ``max_epsilon``) are enforced in the handler, not declared. Generated clients and
fuzzers trust the schema, so it is corrected per app:

- no keys configured: no security requirement, no security scheme, no 401 responses; keys
  configured: the requirement and the 401 stay;
- the settings' bounds are declared on ``POST /classify``, and ``defend=auto`` only where there is
  a threshold to decide with (every served bundle's, or the settings'; without one it is a 422);
- ``model`` and ``version`` of ``POST /classify`` (and ``name`` of ``GET /models/{name}``) list the
  names and versions of the model repository's served bundles (``worker.repository``); a version
  of another model than the one named is a documented 404;
- OpenAPI links lead from ``POST /classify``'s 202 to every operation under ``/jobs/{job_id}``
  (``job_id`` from the response body), so clients and stateful fuzzers can follow a job.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from models.defense_mode import resolve_policy
from worker.repository import Repository
from worker.settings import Settings

JOB_PREFIX = "/jobs/{job_id}"


def _accepts_auto(repository: Repository, settings: Settings) -> bool:
    """Whether ``defend=auto`` is served: every served bundle has a threshold to decide with (its own,
    the settings', or its flag's: ``models.defense_mode.resolve_policy``)."""
    served = repository.served
    if repository.default is None or not served:
        return False  # no bundle: POST /classify answers 503 whatever is sent
    return all(resolve_policy(entry.meta, **settings.bundle_overrides).serves_auto for entry in served)


def _settings_bounds(settings: Settings) -> dict[str, dict[str, Any]]:
    """Query parameter of POST /classify -> keywords to add to its non-null schema branch."""
    return {
        "top_k": {"maximum": settings.max_top_k},
        "steps": {"maximum": settings.max_steps},
        "epsilon": {"maximum": settings.max_epsilon},
    }


def _value_branch(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema of a parameter's value: the non-null branch of FastAPI's ``X | None`` anyOf."""
    for branch in schema.get("anyOf", []):
        if branch.get("type") != "null":
            return branch
    return schema


def _declare_bounds(schema: dict[str, Any], settings: Settings) -> None:
    operation = schema["paths"]["/classify"]["post"]
    repository = Repository.scan(settings)
    bounds = _settings_bounds(settings)
    names = sorted({e.name for e in repository.served})
    versions = sorted({e.version for e in repository.served})
    if names:
        bounds["model"] = {"enum": names}
        bounds["version"] = {"enum": versions}
    auto = _accepts_auto(repository, settings)
    for parameter in operation.get("parameters", []):
        if parameter.get("in") != "query":
            continue
        branch = _value_branch(parameter["schema"])
        branch.update(bounds.get(parameter["name"], {}))
        if parameter["name"] == "defend" and not auto and "enum" in branch:
            branch["enum"] = [value for value in branch["enum"] if value != "auto"]
    model = schema["paths"].get("/models/{name}", {}).get("get")
    for parameter in (model or {}).get("parameters", []):
        if names and parameter.get("in") == "path" and parameter["name"] == "name":
            parameter["schema"] = {**parameter["schema"], "enum": sorted({e.name for e in repository.entries})}
        if names and parameter.get("in") == "query" and parameter["name"] == "version":
            _value_branch(parameter["schema"]).update({"enum": sorted({e.version for e in repository.entries})})


def _match_security(schema: dict[str, Any], keys_configured: bool) -> None:
    if keys_configured:
        return
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            operation.pop("security", None)
            operation.get("responses", {}).pop("401", None)
    components = schema.get("components", {})
    components.pop("securitySchemes", None)


def _link_jobs(schema: dict[str, Any]) -> None:
    accepted = schema["paths"]["/classify"]["post"]["responses"]["202"]
    links = {}
    for path, operations in schema["paths"].items():
        if path != JOB_PREFIX and not path.startswith(JOB_PREFIX + "/"):
            continue
        for method, operation in operations.items():
            links[operation["operationId"]] = {
                "operationId": operation["operationId"],
                "parameters": {"job_id": "$response.body#/job_id"},
                "description": f"{method.upper()} {path} of the accepted job",
            }
    accepted["links"] = links


def contract_schema(base: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """A copy of FastAPI's schema corrected for ``settings`` (see the module docstring)."""
    schema = copy.deepcopy(base)
    _match_security(schema, bool(settings.api_keys))
    _declare_bounds(schema, settings)
    _link_jobs(schema)
    return schema


def install(app: FastAPI, settings: Settings) -> None:
    """Serve ``contract_schema`` of the app's own schema at /openapi.json (built once, cached)."""
    build: Callable[[], dict[str, Any]] = app.openapi
    cached: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if "schema" not in cached:
            cached["schema"] = contract_schema(build(), settings)
        app.openapi_schema = cached["schema"]
        return cached["schema"]

    app.openapi = openapi
