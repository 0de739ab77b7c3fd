"""JSON errors everywhere: ``{"error": {"code", "message"}}``, for our own errors, validation errors,
unknown routes and Redis outages alike, and the matching OpenAPI response declarations."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service import metrics

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class ApiError(Exception):
    """An error answered as JSON; ``reason`` (if any) is counted in requests_rejected_total."""

    def __init__(self, status: int, code: str, message: str, *, reason: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.reason, self.headers = status, code, message, reason, headers


DESCRIPTIONS = {
    401: "missing or wrong API key",
    404: "unknown or expired job, or another key's job",
    409: "the job is not in a state that allows this",
    413: "upload or video too large",
    415: "not a video PyAV can decode (or fewer than 2 frames)",
    422: "bad parameter",
    429: "too many jobs in flight for this key",
    503: "queue full or Redis unavailable (see Retry-After)",
}


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries for the given error codes."""
    return {code: {"model": ErrorBody, "description": DESCRIPTIONS[code]} for code in codes}


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def document_validation_errors(app: FastAPI) -> None:
    """Make the schema tell the truth about 422s: our ErrorBody, not FastAPI's HTTPValidationError."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {})
            for name, model in (("ErrorBody", ErrorBody), ("ErrorDetail", ErrorDetail)):
                if name not in schema["components"]["schemas"]:
                    model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                    model_schema.pop("$defs", None)
                    schema["components"]["schemas"][name] = model_schema
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    response = operation.get("responses", {}).get("422")
                    if response is not None:
                        response["description"] = DESCRIPTIONS[422]
                        response["content"] = {
                            "application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}
                        }
            for unused in ("HTTPValidationError", "ValidationError"):
                schema["components"]["schemas"].pop(unused, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def allowed_methods(request: Request) -> list[str]:
    """Every method of every route on the request's path. Starlette's 405 names only the first
    route that matched the path, but a path may have one route per method (GET and DELETE
    /jobs/{id}), and ``Allow`` must list them all."""
    routes = request.app.router.routes
    return [
        method
        for method in HTTP_METHODS
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)
    ]


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        if exc.reason:
            metrics.REJECTED.labels(reason=exc.reason).inc()
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.REJECTED.labels(reason="bad_parameter").inc()
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "body", "path"))
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return error_response(422, "invalid_parameter", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request))}
        return error_response(exc.status_code, code, str(exc.detail), headers)

    @app.exception_handler(RedisConnectionError)
    @app.exception_handler(RedisTimeoutError)
    async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
        metrics.REJECTED.labels(reason="unavailable").inc()
        log.warning("Redis unavailable: %s", exc)
        return error_response(
            503, "unavailable", "the job store is unavailable; retry later", {"Retry-After": str(RETRY_AFTER_S)}
        )

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal", "internal server error")
