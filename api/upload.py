"""Stream a multipart upload straight to a temporary file, refusing it once it passes the limit.

Starlette's form parser spools the whole body before the route runs; this parser writes the `file`
part as it arrives and stops reading at `max_bytes`, so an oversized upload costs no disk.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from python_multipart.multipart import MultipartParser, parse_options_header

from api.errors import bad_request


@dataclass
class Upload:
    filename: str = ""
    size: int = 0
    sha256: str = ""
    fields: dict[str, str] = field(default_factory=dict)


class _TooLarge(Exception):
    pass


async def receive_upload(
    content_type: str, body: AsyncIterator[bytes], target: Path, max_bytes: int
) -> Upload:
    """Parse `body`; the `file` part goes to `target`, other parts into `fields`. Raises 400s."""
    ctype, params = parse_options_header(content_type)
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise bad_request("Expected multipart/form-data with a 'file' part", param="file")
    upload, digest = Upload(), hashlib.sha256()
    state: dict[str, object] = {"name": None, "header": b"", "headers": {}, "value": b""}
    sink = open(target, "wb")  # noqa: SIM115 - closed in finally, written from the callbacks

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["header"] = bytes(state["header"]) + data[start:end]  # type: ignore[arg-type]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        headers = state["headers"]
        assert isinstance(headers, dict)
        key = bytes(state["header"]).lower()  # type: ignore[arg-type]
        headers[key] = headers.get(key, b"") + data[start:end]

    def on_header_end() -> None:
        state["header"] = b""

    def on_headers_finished() -> None:
        headers = state["headers"]
        assert isinstance(headers, dict)
        _, disposition = parse_options_header(headers.get(b"content-disposition", b""))
        state["name"] = disposition.get(b"name", b"").decode()
        if state["name"] == "file":
            upload.filename = disposition.get(b"filename", b"upload.jsonl").decode(errors="replace")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if state["name"] == "file":
            upload.size += len(chunk)
            if upload.size > max_bytes:
                raise _TooLarge
            digest.update(chunk)
            sink.write(chunk)
        else:
            state["value"] = bytes(state["value"]) + chunk  # type: ignore[arg-type]

    def on_part_end() -> None:
        if state["name"] and state["name"] != "file":
            upload.fields[str(state["name"])] = bytes(state["value"]).decode(errors="replace")  # type: ignore[arg-type]
        state.update(name=None, headers={}, value=b"")

    parser = MultipartParser(
        params[b"boundary"],
        callbacks={  # type: ignore[arg-type]
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        async for chunk in body:
            parser.write(chunk)
        parser.finalize()
    except _TooLarge:
        raise bad_request(
            f"The file is larger than the upload limit of {max_bytes} bytes",
            param="file",
            code="file_too_large",
        ) from None
    finally:
        sink.close()
    if not upload.filename:
        raise bad_request("Missing the 'file' part", param="file")
    upload.sha256 = digest.hexdigest()
    return upload
