"""/v1/keys: list with prefixes (never secrets), create with an expiry, revoke; a revoked or expired
key fails on its very next request, and one user cannot see or revoke another's keys."""

from __future__ import annotations

from datetime import timedelta

from core.db.models import ApiKey, utcnow
from core.db.session import session_scope
from tests.api.conftest import Service


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def test_list_shows_prefixes_and_never_secrets(service: Service) -> None:
    alice = service.new_key("alice")
    created = service.client.post("/v1/keys", headers=alice, json={"name": "ci"}).json()
    assert created["key"].startswith(created["prefix"]) and created["name"] == "ci"
    listed = service.client.get("/v1/keys", headers=alice).json()["data"]
    assert [k["id"] for k in listed][0] == created["id"] and len(listed) == 2
    assert all("key" not in k and len(k["prefix"]) == 10 for k in listed)
    assert alice["Authorization"].removeprefix("Bearer ").startswith(listed[1]["prefix"])


def test_revocation_takes_effect_on_the_next_request(service: Service) -> None:
    alice = service.new_key("alice")
    second = service.client.post("/v1/keys", headers=alice, json={}).json()
    assert service.client.get("/v1/files", headers=bearer(second["key"])).status_code == 200
    revoked = service.client.delete(f"/v1/keys/{second['id']}", headers=alice)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    refused = service.client.get("/v1/files", headers=bearer(second["key"]))
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert service.client.get("/v1/files", headers=alice).status_code == 200


def test_a_key_can_revoke_itself(service: Service) -> None:
    alice = service.new_key("alice")
    own = service.client.get("/v1/keys", headers=alice).json()["data"][0]
    assert service.client.delete(f"/v1/keys/{own['id']}", headers=alice).status_code == 200
    assert service.client.get("/v1/keys", headers=alice).status_code == 401


def test_expired_key_is_refused(service: Service) -> None:
    alice = service.new_key("alice")
    created = service.client.post("/v1/keys", headers=alice, json={"expires_in_days": 1}).json()
    assert created["expires_at"] - created["created_at"] == 86400
    assert service.client.get("/v1/models", headers=bearer(created["key"])).status_code == 200
    with session_scope() as session:  # a day passes
        session.query(ApiKey).filter(ApiKey.public_id == created["id"]).update(
            {"expires_at": utcnow() - timedelta(seconds=1)}
        )
    assert service.client.get("/v1/models", headers=bearer(created["key"])).status_code == 401


def test_other_users_keys_are_invisible_and_unrevokable(service: Service) -> None:
    alice, bob = service.new_key("alice"), service.new_key("bob")
    bobs = service.client.get("/v1/keys", headers=bob).json()["data"][0]
    assert service.client.delete(f"/v1/keys/{bobs['id']}", headers=alice).status_code == 404
    assert [k["id"] for k in service.client.get("/v1/keys", headers=alice).json()["data"]] != [bobs["id"]]
    assert service.client.get("/v1/models", headers=bob).status_code == 200


def test_key_fields_are_bounded(service: Service) -> None:
    alice = service.new_key("alice")
    for body, param in (({"expires_in_days": 0}, "expires_in_days"), ({"name": "x" * 101}, "name")):
        response = service.client.post("/v1/keys", headers=alice, json=body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param
