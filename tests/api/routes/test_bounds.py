"""Every bad input is a 400 in the OpenAI envelope naming the field, and nothing is stored or queued:
hyperparameter bounds, integer ranges, suffixes, metadata, filenames, multipart and truncated
bodies, nesting and row limits, and an Idempotency-Key reused with another body (409)."""

from __future__ import annotations

import json

import pytest

from core.config import get_settings
from tests.api.conftest import CHAT_ROW, Service, jsonl

MODEL = "smollm2-135m-instruct"


def stored_files(service: Service) -> list[str]:
    folder = service.home / "files"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def assert_400(response, param: str | None) -> dict:  # noqa: ANN001 - an httpx response
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    return error


# ------------------------------------------------------------------------------------------ jobs

HYPERPARAMETER_CASES = [
    ("lora_r", 10**6),
    ("lora_r", 0),
    ("n_epochs", 10**9),
    ("batch_size", 10**9),
    ("micro_batch_size", 10**6),
    ("group_size", 0),
    ("group_size", -64),
    ("group_size", 100),
    ("lora_alpha", -16),
    ("lora_alpha", 0),
    ("max_seq_len", 10**9),
    ("max_seq_len", 2**70),
    ("max_steps", 0),
    ("checkpoint_every", 10**9),
    ("learning_rate_multiplier", 0),
    ("learning_rate_multiplier", -1),
    ("learning_rate_multiplier", 1e9),
    ("lora_dropout", 1.0),
    ("lora_targets", ["nonexistent_proj"]),
    ("lora_targets", []),
    ("lora_targets", "q_proj,v_proj"),
]


@pytest.mark.parametrize(("name", "value"), HYPERPARAMETER_CASES)
@pytest.mark.parametrize("where", ["hyperparameters", "method"])
def test_hyperparameter_out_of_bounds_is_400_naming_it(
    service: Service, alice: dict[str, str], training_file: str, name: str, value: object, where: str
) -> None:
    hp = {name: value}
    body = (
        {"hyperparameters": hp}
        if where == "hyperparameters"
        else {"method": {"type": "supervised", "supervised": {"hyperparameters": hp}}}
    )
    response = service.client.post(
        "/v1/fine_tuning/jobs", headers=alice, json={"model": MODEL, "training_file": training_file, **body}
    )
    assert_400(response, f"hyperparameters.{name}")
    assert service.enqueued == []


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN"])
def test_non_finite_learning_rate_multiplier_is_400(
    service: Service, alice: dict[str, str], training_file: str, literal: str
) -> None:
    # Python's json module reads these literals, so they reach validation unless refused there.
    raw = (
        f'{{"model": "{MODEL}", "training_file": "{training_file}", '
        f'"hyperparameters": {{"learning_rate_multiplier": {literal}}}}}'
    )
    response = service.client.post(
        "/v1/fine_tuning/jobs", headers={**alice, "Content-Type": "application/json"}, content=raw
    )
    assert_400(response, "hyperparameters.learning_rate_multiplier")


def test_the_bounds_themselves_are_accepted(
    service: Service, alice: dict[str, str], training_file: str
) -> None:
    hp = {"lora_r": 1024, "n_epochs": 100, "lora_targets": ["q_proj", "v_proj"], "group_size": -1,
          "learning_rate_multiplier": 100, "max_seq_len": 16, "quantization": "rtn"}  # fmt: skip
    response = service.client.post(
        "/v1/fine_tuning/jobs",
        headers=alice,
        json={"model": MODEL, "training_file": training_file, "seed": 2**31 - 1, "hyperparameters": hp},
    )
    assert response.status_code == 200, response.text
    assert response.json()["hyperparameters"]["lora_targets"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"seed": 2**70}, "seed"),
        ({"seed": 2**31}, "seed"),
        ({"seed": -1}, "seed"),
        ({"suffix": "a/b"}, "suffix"),
        ({"suffix": "a:b"}, "suffix"),
        ({"suffix": "has space"}, "suffix"),
        ({"suffix": ""}, "suffix"),
        ({"metadata": {"k" * 10_000: "v"}}, "metadata"),
        ({"metadata": {"": "v"}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"integrations": [{}] * 9}, "integrations"),
    ],
    ids=lambda value: str(value)[:40],
)
def test_job_field_out_of_range_is_400_naming_it(
    service: Service, alice: dict[str, str], training_file: str, body: dict, param: str
) -> None:
    response = service.client.post(
        "/v1/fine_tuning/jobs", headers=alice, json={"model": MODEL, "training_file": training_file, **body}
    )
    assert_400(response, param)
    assert service.enqueued == []


def test_deeply_nested_json_body_is_400(service: Service, alice: dict[str, str]) -> None:
    raw = '{"model": "m", "training_file": "f", "metadata": ' + "[" * 100_000 + "]" * 100_000 + "}"
    response = service.client.post(
        "/v1/fine_tuning/jobs", headers={**alice, "Content-Type": "application/json"}, content=raw
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_idempotency_key_reused_with_another_body_is_409(
    service: Service, alice: dict[str, str], training_file: str
) -> None:
    headers = {**alice, "Idempotency-Key": "retry-1"}
    body = {"model": MODEL, "training_file": training_file, "suffix": "one"}
    first = service.client.post("/v1/fine_tuning/jobs", headers=headers, json=body)
    again = service.client.post("/v1/fine_tuning/jobs", headers=headers, json=body)
    assert first.status_code == again.status_code == 200 and first.json()["id"] == again.json()["id"]
    other = service.client.post("/v1/fine_tuning/jobs", headers=headers, json={**body, "suffix": "two"})
    assert other.status_code == 409, other.text
    error = other.json()["error"]
    assert error["code"] == "idempotency_key_reused" and error["param"] == "Idempotency-Key"
    assert service.enqueued == [first.json()["id"]]


# ---------------------------------------------------------------------------------------- uploads


@pytest.mark.parametrize(
    ("sent", "shown"),
    [
        ("../../etc/passwd", "passwd"),
        ("..\\..\\windows\\win.ini", "win.ini"),
        ("a\x00b\nc.jsonl", "a_b_c.jsonl"),
        ('x"; filename=evil.sh', "x__ filename=evil.sh"),
        ("...", "upload.jsonl"),
        ("é" * 1000, "é" * 200),
    ],
)
def test_upload_filename_is_made_safe_for_display(
    service: Service, alice: dict[str, str], sent: str, shown: str
) -> None:
    file = service.upload(alice, jsonl([CHAT_ROW]), name=sent)
    assert file["filename"] == shown
    assert service.client.get(f"/v1/files/{file['id']}", headers=alice).json()["filename"] == shown


def test_filename_longer_than_a_part_header_may_be_is_400(service: Service, alice: dict[str, str]) -> None:
    response = service.client.post(
        "/v1/files",
        headers=alice,
        files={"file": ("a" * 10_000, jsonl([CHAT_ROW]))},
        data={"purpose": "fine-tune"},
    )
    assert assert_400(response, "file")["code"] == "invalid_multipart"
    assert stored_files(service) == []


def _multipart(boundary: str, parts: str) -> bytes:
    return parts.replace("\n", "\r\n").replace("BOUNDARY", boundary).encode()


FORM = (
    """--BOUNDARY
Content-Disposition: form-data; name="purpose"

fine-tune
--BOUNDARY
Content-Disposition: form-data; name="file"; filename="train.jsonl"
Content-Type: application/octet-stream

"""
    + json.dumps(CHAT_ROW)
    + "\n"
)


@pytest.mark.parametrize(
    ("content_type", "body", "code"),
    [
        (
            "multipart/form-data; boundary=other",
            _multipart("xyz", FORM + "\n--BOUNDARY--\n"),
            "invalid_multipart",
        ),
        ("multipart/form-data; boundary=xyz", _multipart("xyz", FORM), "truncated_body"),  # no closing
        ("multipart/form-data; boundary=xyz", _multipart("xyz", FORM[: len(FORM) // 2]), "truncated_body"),
        (
            "multipart/form-data; boundary=xyz",
            b"--xyz\r\ngarbage without headers\r\n\r\n",
            "invalid_multipart",
        ),
        ("multipart/form-data", _multipart("xyz", FORM + "\n--BOUNDARY--\n"), "invalid_value"),
        ("application/json", b"{}", "invalid_value"),
    ],
    ids=["wrong-boundary", "no-closing-boundary", "cut-mid-part", "garbage-headers", "no-boundary", "json"],
)
def test_malformed_or_truncated_multipart_is_400_and_stores_nothing(
    service: Service, alice: dict[str, str], content_type: str, body: bytes, code: str
) -> None:
    response = service.client.post("/v1/files", headers={**alice, "Content-Type": content_type}, content=body)
    error = assert_400(response, "file")
    assert error["code"] == code
    assert stored_files(service) == []
    assert service.client.get("/v1/files", headers=alice).json()["data"] == []


def test_oversized_form_field_is_400(service: Service, alice: dict[str, str]) -> None:
    form = FORM.replace("fine-tune\n", "x" * 5000 + "\n") + "\n--BOUNDARY--\n"
    response = service.client.post(
        "/v1/files",
        headers={**alice, "Content-Type": "multipart/form-data; boundary=xyz"},
        content=_multipart("xyz", form),
    )
    assert assert_400(response, "file")["code"] == "invalid_multipart"


def test_deeply_nested_row_is_a_row_error(service: Service, alice: dict[str, str]) -> None:
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    response = service.client.post(
        "/v1/files",
        headers=alice,
        files={"file": ("deep.jsonl", jsonl([CHAT_ROW]) + deep)},
        data={"purpose": "fine-tune"},
    )
    error = assert_400(response, "file")
    assert error["code"] == "invalid_training_file" and error["line"] == 2
    assert "nested deeper" in error["errors"][0]["message"]
    assert stored_files(service) == []


def test_upload_over_the_row_limit_is_400(
    service: Service, alice: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(get_settings(), "max_upload_rows", 5)
    response = service.client.post(
        "/v1/files",
        headers=alice,
        files={"file": ("many.jsonl", jsonl([CHAT_ROW], copies=6))},
        data={"purpose": "fine-tune"},
    )
    assert assert_400(response, "file")["code"] == "too_many_rows"
    assert stored_files(service) == []


# ------------------------------------------------------------------------------------- inference


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"seed": 2**80}, "seed"),
        ({"seed": -(2**80)}, "seed"),
        ({"n": 17}, "n"),
        ({"n": 0}, "n"),
        ({"max_tokens": 10**9}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"stop": ["x" * 257]}, "stop"),
        ({"temperature": 3}, "temperature"),
    ],
    ids=lambda value: str(value)[:30],
)
def test_chat_parameter_out_of_range_is_400_naming_it(
    service: Service, alice: dict[str, str], body: dict, param: str
) -> None:
    response = service.client.post(
        "/v1/chat/completions",
        headers=alice,
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **body},
    )
    assert_400(response, param)
