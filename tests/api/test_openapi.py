"""The OpenAPI schema says what the API does (bearer scheme, the error envelope on 400, no 422), the
docs pages load their assets from this server, 405s list every method, and the dashboard is sent
with security headers."""

from __future__ import annotations

import re

from tests.api.conftest import Service


def test_schema_declares_bearer_auth_and_the_error_envelope(service: Service) -> None:
    schema = service.client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key: `modulora keys create --user NAME`",
    }
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)
            assert responses["400"]["content"]["application/json"]["schema"] == error_ref
            if path != "/health":
                assert operation["security"] == [{"HTTPBearer": []}], (method, path)
                assert "401" in responses, (method, path)
    inference = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"404", "429"} <= inference.keys()


def test_docs_pages_use_the_vendored_assets(service: Service) -> None:
    for page, asset in (("/docs", "/vendor/swagger-ui/swagger-ui-bundle.js"),
                        ("/redoc", "/vendor/redoc/redoc.standalone.js")):  # fmt: skip
        html = service.client.get(page).text
        scripts = re.findall(r'src="([^"]+)"', html)
        assert asset in scripts and not any(src.startswith("http") for src in scripts), scripts
        assert "fonts.googleapis" not in html
        assert service.client.get(asset).status_code == 200


def test_wrong_method_is_405_allowing_every_documented_method(service: Service) -> None:
    for method, path, allowed in (
        ("DELETE", "/v1/files", "GET, POST"),
        ("GET", "/v1/chat/completions", "POST"),
        ("PUT", "/v1/fine_tuning/jobs/ftjob-x", "DELETE, GET"),
    ):
        response = service.client.request(method, path, headers=service.new_key("ann"))
        assert response.status_code == 405, (method, path, response.text)
        assert response.headers["allow"] == allowed
        assert response.json()["error"]["type"] == "invalid_request_error"


def test_dashboard_is_sent_with_security_headers(service: Service) -> None:
    response = service.client.get("/")
    assert response.status_code == 200
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"
    api = service.client.get("/health")
    assert api.headers["x-content-type-options"] == "nosniff" and "content-security-policy" not in api.headers
