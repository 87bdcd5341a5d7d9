"""POST/GET/DELETE /v1/files: validated uploads, 400s that name line and field, nothing stored."""

from __future__ import annotations

import pytest

from tests.api.conftest import CHAT_ROW, Service, jsonl


def stored_files(service: Service) -> list[str]:
    folder = service.home / "files"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_upload_chat_file_reports_format_and_rows(service: Service) -> None:
    alice = service.new_key("alice")
    file = service.upload(alice, jsonl([CHAT_ROW], copies=12))
    assert file["object"] == "file" and file["purpose"] == "fine-tune" and file["id"].startswith("file-")
    assert file["report"]["format"] == "messages" and file["report"]["rows"] == 12
    assert stored_files(service) == [file["id"]]
    content = service.client.get(f"/v1/files/{file['id']}/content", headers=alice)
    assert content.content == jsonl([CHAT_ROW], copies=12)


@pytest.mark.parametrize(
    ("content", "line", "field"),
    [
        (jsonl([CHAT_ROW]) + b'{"messages": [\n', 2, None),  # malformed JSON on line 2
        (jsonl([CHAT_ROW]) + b'{"messages": [{"role": "robot", "content": "x"}]}\n', 2, "messages[0].role"),
        (b"", None, None),
        (jsonl([CHAT_ROW]) + "é".encode("latin-1") + b"\n", 2, None),  # not UTF-8
    ],
    ids=["malformed-json", "wrong-field", "empty", "non-utf8"],
)
def test_upload_bad_file_is_400_with_line_and_field_and_stores_nothing(
    service: Service, content: bytes, line: int | None, field: str | None
) -> None:
    alice = service.new_key("alice")
    response = service.client.post(
        "/v1/files", headers=alice, files={"file": ("bad.jsonl", content)}, data={"purpose": "fine-tune"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_training_file" and error["param"] == "file"
    assert error["line"] == line and error["field"] == field
    assert stored_files(service) == []
    assert service.client.get("/v1/files", headers=alice).json()["data"] == []


def test_upload_oversized_file_is_400_and_stores_nothing(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.config import get_settings

    monkeypatch.setattr(get_settings(), "max_upload_bytes", 1000)
    alice = service.new_key("alice")
    response = service.client.post(
        "/v1/files",
        headers=alice,
        files={"file": ("big.jsonl", jsonl([CHAT_ROW], 40))},
        data={"purpose": "fine-tune"},
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "file_too_large"
    assert stored_files(service) == []


def test_upload_wrong_purpose_is_400(service: Service) -> None:
    response = service.client.post(
        "/v1/files",
        headers=service.new_key("alice"),
        files={"file": ("t.jsonl", jsonl([CHAT_ROW]))},
        data={"purpose": "batch"},
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "purpose"


def test_request_without_or_with_wrong_key_is_401(service: Service) -> None:
    for headers in ({}, {"Authorization": "Bearer mlk-wrong"}, {"Authorization": "Basic abc"}):
        response = service.client.get("/v1/files", headers=headers)
        assert response.status_code == 401
        assert set(response.json()["error"]) >= {"message", "type", "param", "code"}
    assert service.client.get("/health").status_code == 200


def test_other_users_file_is_404(service: Service) -> None:
    file = service.upload(service.new_key("alice"), jsonl([CHAT_ROW]))
    bob = service.new_key("bob")
    for method, path in (("get", ""), ("get", "/content"), ("delete", "")):
        response = service.client.request(method, f"/v1/files/{file['id']}{path}", headers=bob)
        assert response.status_code == 404 and response.json()["error"]["code"] == "file_not_found"
    assert service.client.get("/v1/files", headers=bob).json()["data"] == []


def test_list_files_pages_with_after_and_ends_on_empty_page(service: Service) -> None:
    alice = service.new_key("alice")
    ids = [service.upload(alice, jsonl([CHAT_ROW]))["id"] for _ in range(3)]
    first = service.client.get("/v1/files", params={"limit": 2}, headers=alice).json()
    assert [f["id"] for f in first["data"]] == ids[::-1][:2] and first["has_more"] is True
    second = service.client.get(
        "/v1/files", params={"limit": 2, "after": first["data"][-1]["id"]}, headers=alice
    ).json()
    assert [f["id"] for f in second["data"]] == [ids[0]] and second["has_more"] is False
    last = service.client.get("/v1/files", params={"after": ids[0]}, headers=alice).json()
    assert last["data"] == [] and last["has_more"] is False


def test_delete_file_removes_row_and_bytes(service: Service) -> None:
    alice = service.new_key("alice")
    file = service.upload(alice, jsonl([CHAT_ROW]))
    assert service.client.delete(f"/v1/files/{file['id']}", headers=alice).json()["deleted"] is True
    assert stored_files(service) == []
    assert service.client.get(f"/v1/files/{file['id']}", headers=alice).status_code == 404
