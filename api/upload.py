"""Stream a multipart upload straight to a temporary file, refusing it once it passes the limit.

Starlette's form parser spools the whole body before the route runs; this parser writes the `file`
part as it arrives and stops reading at `max_bytes`, so an oversized upload costs no disk.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from api.errors import bad_request

DEFAULT_FILENAME = "upload.jsonl"
FILENAME_MAX = 200
MAX_FIELD_BYTES = 1024
"""Form fields besides `file` (`purpose`) are short words; more is not a form this route takes."""
_UNSAFE = re.compile(r"[^\w.\-+=@,()\[\] ]")


def display_filename(sent: str) -> str:
    """The name shown for an upload: the last path component of what the client sent, without
    control characters, quotes or separators (it is echoed in listings and Content-Disposition).
    Clients percent-encode quotes and line breaks in the header (the HTML form rule), so decode first."""
    name = unicodedata.normalize("NFC", urllib.parse.unquote(sent)).replace("\\", "/").rsplit("/", 1)[-1]
    name = _UNSAFE.sub("_", name).strip(" .")[:FILENAME_MAX]
    return name or DEFAULT_FILENAME


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
    state: dict[str, object] = {"name": None, "header": b"", "headers": {}, "value": b"", "ended": False}
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
            upload.filename = display_filename(disposition.get(b"filename", b"").decode(errors="replace"))

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
            if len(state["value"]) > MAX_FIELD_BYTES:  # type: ignore[arg-type]
                raise MultipartParseError(f"form field {state['name']!r} is over {MAX_FIELD_BYTES} bytes")

    def on_part_end() -> None:
        if state["name"] and state["name"] != "file":
            upload.fields[str(state["name"])] = bytes(state["value"]).decode(errors="replace")  # type: ignore[arg-type]
        state.update(name=None, headers={}, value=b"")

    def on_end() -> None:
        state["ended"] = True

    parser = MultipartParser(
        params[b"boundary"],
        callbacks={  # type: ignore[arg-type]
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_end": on_end,
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
    except MultipartParseError as e:
        raise bad_request(f"Malformed multipart body: {e}", param="file", code="invalid_multipart") from None
    except ClientDisconnect:
        raise bad_request(
            "The upload was cut off (the client disconnected)", param="file", code="truncated_body"
        ) from None
    finally:
        sink.close()
    if not state["ended"]:
        raise bad_request(
            "The multipart body ended without its closing boundary (truncated upload)",
            param="file",
            code="truncated_body",
        )
    if not upload.filename:
        raise bad_request("Missing the 'file' part", param="file")
    upload.sha256 = digest.hexdigest()
    return upload
