"""Stream a multipart upload's ``file`` field to disk with a hard size cap.

Starlette's form parsing spools the whole body before the handler runs, so the cap would come
too late; here the body is parsed as it arrives and the transfer is cut at the first byte past
the limit (413), and a Content-Length beyond it is refused before anything is read.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from service.errors import ApiError

log = logging.getLogger(__name__)

FIELD = "file"


class _TooLarge(Exception):
    pass


async def receive_upload(request: Request, dest: Path, max_bytes: int) -> int:
    """Write the ``file`` part of a multipart/form-data request to ``dest``; returns its size."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise ApiError(
            415, "not_multipart", "send the video as multipart/form-data in a field named 'file'", reason="not_video"
        )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + 64 * 1024:
        raise ApiError(413, "too_large", f"upload larger than {max_bytes} bytes", reason="too_large")

    state = {"name": None, "header_field": b"", "header_value": b"", "headers": {}, "found": False, "size": 0}
    dest.parent.mkdir(parents=True, exist_ok=True)
    handle = open(dest, "wb")

    def on_part_begin() -> None:
        state["headers"], state["name"] = {}, None

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["header_field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["header_value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["header_field"].lower()] = state["header_value"]
        state["header_field"], state["header_value"] = b"", b""

    def on_headers_finished() -> None:
        _, disposition = parse_options_header(state["headers"].get(b"content-disposition", b""))
        state["name"] = disposition.get(b"name", b"").decode("latin-1")
        if state["name"] == FIELD:
            state["found"] = True

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["name"] != FIELD:
            return
        state["size"] += end - start
        if state["size"] > max_bytes:
            raise _TooLarge
        handle.write(data[start:end])

    parser = MultipartParser(
        params[b"boundary"],
        callbacks={
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
        },
    )
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except _TooLarge:
        handle.close()
        dest.unlink(missing_ok=True)
        raise ApiError(413, "too_large", f"upload larger than {max_bytes} bytes", reason="too_large") from None
    except ApiError:
        handle.close()
        dest.unlink(missing_ok=True)
        raise
    except Exception as exc:  # malformed multipart
        handle.close()
        dest.unlink(missing_ok=True)
        raise ApiError(
            422, "invalid_upload", f"malformed multipart body ({type(exc).__name__})", reason="bad_parameter"
        ) from exc
    handle.close()
    if not state["found"]:
        dest.unlink(missing_ok=True)
        raise ApiError(422, "missing_file", "no multipart field named 'file'", reason="bad_parameter")
    return state["size"]
