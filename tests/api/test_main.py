"""The app as a whole: no torch at start-up, every router found, OpenAPI, health, metrics, models."""

from __future__ import annotations

import subprocess
import sys

from tests.api.conftest import Service


def test_import_app_does_not_import_torch() -> None:
    # Chat templates render through transformers' chat_template_utils, which loads without torch.
    code = "import sys, api.main; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_openapi_lists_every_route(service: Service) -> None:
    paths = service.client.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/files",
        "/v1/files/{file_id}/content",
        "/v1/fine_tuning/jobs",
        "/v1/fine_tuning/jobs/{job_id}/cancel",
        "/v1/fine_tuning/jobs/{job_id}/events",
        "/v1/fine_tuning/jobs/{job_id}/checkpoints",
        "/v1/fine_tuning/jobs/{job_id}/metrics/stream",
        "/v1/models",
        "/health",
        "/metrics",
    ):
        assert path in paths, path
    assert "multipart/form-data" in paths["/v1/files"]["post"]["requestBody"]["content"]


def test_unknown_route_is_404_in_the_error_envelope(service: Service) -> None:
    response = service.client.get("/v1/nothing-here", headers=service.new_key("alice"))
    assert response.status_code == 404 and set(response.json()["error"]) >= {
        "message",
        "type",
        "param",
        "code",
    }


def test_health_needs_no_key(service: Service) -> None:
    assert service.client.get("/health").json() == {"status": "ok", "database": "ok"}


def test_prometheus_metrics_count_jobs_by_status_for_operators_only(service: Service) -> None:
    alice, operator = service.new_key("alice"), service.new_key("ops", operator=True)
    assert service.client.get("/metrics").status_code == 401
    refused = service.client.get("/metrics", headers=alice)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "operator_only"
    text = service.client.get("/metrics", headers=operator).text
    assert 'modulora_jobs{status="queued"} 0.0' in text and "modulora_http_requests_total" in text


def test_models_lists_base_models_for_everyone(service: Service) -> None:
    models = service.client.get("/v1/models", headers=service.new_key("alice")).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["smollm2-135m-instruct"]
    assert service.client.get("/v1/models/ft:nope", headers=service.new_key("bob")).status_code == 404
