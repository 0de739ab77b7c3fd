"""The web page: ``GET /`` and its static files (``service/static``: HTML, JS, CSS; no build step).

The page and its assets are public (they hold no data; with API keys enabled the page asks for the
key and sends it as a bearer header on its API calls). Only the known files are served, by fixed
name, so no client text becomes a path. A strict Content-Security-Policy keeps the page from
loading anything that is not the service's own (no CDN, no web fonts, no inline script).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from service.errors import ApiError
from service.routes.figures import router as figures_router

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
STATIC_FILES: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob: data:",
        "media-src 'self' blob:",
        "connect-src 'self'",
        "base-uri 'self'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(tags=["web page"])
# The API behind the page's pictures; included here so the app needs one include for this feature.
router.include_router(figures_router)


def _file(name: str) -> Response:
    headers = dict(_HEADERS)
    if name == "index.html":
        headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        headers["X-Frame-Options"] = "DENY"
    return Response((STATIC_DIR / name).read_bytes(), media_type=STATIC_FILES[name], headers=headers)


@router.get("/", include_in_schema=False)
def index() -> Response:
    """The web page: upload a video, follow the job, see labels, videos, flow and MC-loss pictures."""
    return _file("index.html")


@router.get("/static/{name}", include_in_schema=False)
def static_file(name: str) -> Response:
    if name not in STATIC_FILES or name == "index.html":
        raise ApiError(404, "not_found", "no such file")
    return _file(name)
