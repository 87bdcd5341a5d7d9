"""The one error shape: `{"error": {"message", "type", "param", "code"}}` (OpenAI's, so the SDK
raises the right exception class). Routes raise `APIError`; `api.main` renders it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class APIError(Exception):
    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.details = details or {}
        self.headers = headers

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return {"error": error | self.details}


def not_found(kind: str, id: str, param: str | None = None) -> APIError:
    # Another user's object is reported exactly like a missing one: ids do not leak.
    return APIError(404, f"No {kind} with id {id!r}", param=param, code=f"{kind}_not_found")


def bad_request(
    message: str,
    *,
    param: str | None = None,
    code: str = "invalid_value",
    details: dict[str, Any] | None = None,
) -> APIError:
    return APIError(400, message, param=param, code=code, details=details)


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """What every 4xx and 5xx carries (OpenAI's envelope)."""

    error: ErrorBody


_DESCRIPTIONS = {
    400: "Invalid request: `error.param` names the field",
    401: "Missing, unknown, revoked or expired API key",
    403: "Not allowed for this key",
    404: "No such object (another user's objects read as missing)",
    405: "Method not allowed",
    409: "Conflicts with the object's state",
    410: "The object's files are no longer on this server",
    429: "Over a per-user limit; retry after `Retry-After` seconds",
    503: "A dependency (database, engine) is unavailable",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for these statuses, each with the error envelope."""
    return {status: {"model": ErrorResponse, "description": _DESCRIPTIONS[status]} for status in statuses}
