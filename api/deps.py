"""Request dependencies: a database session and the user behind the Bearer key."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api import crud
from api.errors import APIError
from core.db.models import User
from core.db.session import new_session


def get_db() -> Iterator[Session]:
    session = new_session()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_db)]


def get_current_user(request: Request, session: SessionDep) -> User:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key:
        raise APIError(
            401,
            "Missing API key: send 'Authorization: Bearer <key>' "
            "(create one with `modulora keys create --user NAME`)",
            type="invalid_request_error",
            code="missing_api_key",
        )
    user = crud.user_for_key(session=session, key=key.strip())
    if user is None:
        raise APIError(
            401, "Incorrect API key provided", type="invalid_request_error", code="invalid_api_key"
        )
    return user


CurrentUser = Annotated[User, Depends(get_current_user)]
