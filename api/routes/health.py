"""GET /health: liveness plus a database round trip (no key needed)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlalchemy import text

from api.deps import SessionDep
from api.errors import APIError

router = APIRouter(tags=["health"])


@router.get("/health")
def health(session: SessionDep) -> dict[str, Any]:
    """`{"status": "ok"}` when the API can reach its database."""
    try:
        session.execute(text("SELECT 1"))
    except Exception as e:  # any driver error means "not healthy", reported, not raised
        raise APIError(
            503, f"database unreachable: {type(e).__name__}", type="server_error", code="database_unavailable"
        ) from e
    return {"status": "ok", "database": "ok"}
