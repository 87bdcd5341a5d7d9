"""Request dependencies: a database session and the user behind the Bearer key.

Authentication reads the key through its own short session, so a route that streams or waits
(uploads, chat, metric streams) holds no database connection while it does; such routes open
`session_scope()` only around their queries instead of taking `SessionDep`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api import crud
from api.errors import APIError
from core.db.models import User
from core.db.session import new_session, session_scope


def get_db() -> Iterator[Session]:
    session = new_session()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_db)]


# Declares the bearer scheme in the OpenAPI schema (so /docs can authorize); the checks and their
# 401 envelope are ours (auto_error=False).
_bearer = HTTPBearer(auto_error=False, description="An API key: `modulora keys create --user NAME`")


def get_current_user(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> User:
    key = credentials.credentials if credentials is not None else ""
    if not key:
        raise APIError(
            401,
            "Missing API key: send 'Authorization: Bearer <key>' "
            "(create one with `modulora keys create --user NAME`)",
            type="invalid_request_error",
            code="missing_api_key",
        )
    with session_scope() as session:
        user = crud.user_for_key(session=session, key=key.strip())
    if user is None:
        raise APIError(
            401,
            "Incorrect API key provided (unknown, revoked or expired)",
            type="invalid_request_error",
            code="invalid_api_key",
        )
    return user


CurrentUser = Annotated[User, Depends(get_current_user)]
