"""/v1/keys: your API keys: list (prefix, never the secret), create (the secret shown once, with an
optional expiry), revoke. A revoked or expired key fails from its next request on: every request
looks its key up (`api.deps.get_current_user`)."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api import crud
from api.deps import CurrentUser
from api.errors import not_found
from api.schemas import ListPage
from core.db.models import ApiKey, utcnow
from core.db.session import session_scope

router = APIRouter(prefix="/v1/keys", tags=["keys"])
MAX_EXPIRY_DAYS = 3650


class KeyObject(BaseModel):
    id: str
    object: str = "api_key"
    name: str | None
    prefix: str
    """The key's first characters, to tell keys apart; the secret itself is never shown again."""
    created_at: int
    expires_at: int | None
    revoked_at: int | None


class NewKeyObject(KeyObject):
    key: str
    """The secret: shown in this response only."""


class KeyCreate(BaseModel):
    name: str | None = Field(None, max_length=100)
    expires_in_days: int | None = Field(None, ge=1, le=MAX_EXPIRY_DAYS)


def _public(row: ApiKey) -> KeyObject:
    def ts(value):  # noqa: ANN001, ANN202 - a datetime or None
        return int(value.timestamp()) if value is not None else None

    return KeyObject(
        id=row.public_id,
        name=row.name,
        prefix=row.prefix,
        created_at=int(row.created_at.timestamp()),
        expires_at=ts(row.expires_at),
        revoked_at=ts(row.revoked_at),
    )


@router.get("", response_model=ListPage[KeyObject])
def list_keys(user: CurrentUser) -> ListPage[KeyObject]:
    """Your keys, newest first, revoked and expired ones included."""
    with session_scope() as session:
        return ListPage(data=[_public(row) for row in crud.user_keys(session=session, user_id=user.id)])


@router.post("", response_model=NewKeyObject)
def create_key(body: KeyCreate, user: CurrentUser) -> NewKeyObject:
    """A new key for you; its secret is in this response only."""
    expires_at = utcnow() + timedelta(days=body.expires_in_days) if body.expires_in_days else None
    with session_scope() as session:
        secret, row = crud.add_key(session=session, user_id=user.id, name=body.name, expires_at=expires_at)
        return NewKeyObject(**_public(row).model_dump(), key=secret)


@router.delete("/{key_id}", response_model=KeyObject)
def revoke_key(key_id: str, user: CurrentUser) -> KeyObject:
    """Revoke one of your keys (the one making this request too): it fails from its next request."""
    with session_scope() as session:
        row = crud.get_key(session=session, user_id=user.id, key_id=key_id)
        if row is None:
            raise not_found("key", key_id, param="key_id")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
        return _public(row)
