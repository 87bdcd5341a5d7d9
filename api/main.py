"""The FastAPI app: error envelope, every router in `api/routes/`, the dashboard at `/`.

Run with `modulora serve` (or `uvicorn api.main:app`). Nothing here imports torch: training runs
in the workers, and the inference engine imports it lazily on first use.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import modulora
from api import routes, storage
from api.errors import APIError, ErrorResponse, error_responses
from api.routes.metrics import LATENCY, REQUESTS
from core.config import get_settings

logger = logging.getLogger(__name__)
WEB_DIR = Path(__file__).resolve().parent.parent / "web"


def _envelope(
    status: int,
    message: str,
    *,
    type: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    error = APIError(status, message, type=type, param=param, code=code)
    return JSONResponse(error.body(), status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else exc.headers
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        location = [
            str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path", "header")
        ]
        param = ".".join(location) or None
        return _envelope(
            400,
            f"{param or 'request'}: {first.get('msg', 'invalid')}",
            type="invalid_request_error",
            param=param,
            code="invalid_value",
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            # FastAPI makes one route per method, and Starlette's 405 names only the first route
            # that matched the path; `Allow` must list every method the path has.
            headers = {"Allow": ", ".join(_allowed_methods(request))}
        return _envelope(
            exc.status_code,
            str(exc.detail),
            type="invalid_request_error" if exc.status_code < 500 else "api_error",
            headers=headers,
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return _envelope(500, f"Internal error: {type(exc).__name__}", type="server_error")


def _allowed_methods(request: Request) -> list[str]:
    """The methods the OpenAPI schema documents for the request's path (what `Allow` must say)."""
    app = request.app
    if not hasattr(app.state, "path_methods"):
        app.state.path_methods = [
            (re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(path)) + "$"),
             {method.upper() for method in operations})
            for path, operations in app.openapi()["paths"].items()
        ]  # fmt: skip
    path = request.url.path
    return sorted(set().union(*(methods for regex, methods in app.state.path_methods if regex.match(path))))


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, saying what the API returns: the error envelope on 400 (FastAPI documents
    422, which this API never sends), 401 on routes that need a key, 404 on routes with a path
    parameter; routes add their own (409, 429, ...) through `error_responses`."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas["ErrorResponse"] = error_schema
        for name, definition in schemas["ErrorResponse"].pop("$defs", {}).items():
            schemas[name] = definition
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                wanted = [400]
                if operation.get("security"):
                    wanted.append(401)
                if "{" in path:
                    wanted.append(404)
                for status, entry in error_responses(*wanted).items():
                    responses.setdefault(
                        str(status),
                        {
                            "description": entry["description"],
                            "content": {
                                "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
                            },
                        },
                    )
        app.openapi_schema = schema
    return app.openapi_schema


def _add_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc from the copies in web/vendor/: no CDN, so they work offline."""

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{app.title} API",
            swagger_js_url="/vendor/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url="/vendor/swagger-ui/swagger-ui.css",
            swagger_favicon_url="/vendor/swagger-ui/favicon-32x32.png",
            swagger_ui_parameters={"persistAuthorization": True},
        )

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title=f"{app.title} API",
            redoc_js_url="/vendor/redoc/redoc.standalone.js",
            with_google_fonts=False,
        )


SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
DASHBOARD_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
"""The dashboard loads only its own files; styles set from scripts (the charts) need 'unsafe-inline'.
/docs and /redoc start from inline scripts, so they get the other headers but not this policy."""


def _security_headers(path: str) -> dict[str, str]:
    if path.startswith(("/v1/", "/docs", "/redoc", "/openapi.json", "/health", "/metrics")):
        return SECURITY_HEADERS
    return SECURITY_HEADERS | {"Content-Security-Policy": DASHBOARD_CSP}


class _ObserveRequests:
    """Counts and times requests for /metrics and adds the security headers. A plain ASGI
    middleware: Starlette's BaseHTTPMiddleware would hide client disconnects from the routes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500
        extra_headers = _security_headers(scope["path"])

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                for name, value in extra_headers.items():
                    headers.setdefault(name, value)
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            REQUESTS.labels(scope["method"], route, str(status)).inc()
            LATENCY.labels(route).observe(time.perf_counter() - started)


class _Dashboard(StaticFiles):
    """The dashboard's files at /. Requests reach this mount when no API route took them, so one for
    an API path with another method is answered 405 (FastAPI's routers would leave it to the mount,
    which says 404)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        allowed = _allowed_methods(Request(scope, receive))
        if allowed:
            response = _envelope(
                405, "Method Not Allowed", type="invalid_request_error", headers={"Allow": ", ".join(allowed)}
            )
            await response(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def _include_routers(app: FastAPI) -> None:
    """Every module in api/routes/ that defines `router` (new route files need no edit here)."""
    for module_info in sorted(pkgutil.iter_modules(routes.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{routes.__name__}.{module_info.name}")
        router = getattr(module, "router", None)
        if router is not None:
            app.include_router(router)


@asynccontextmanager
async def _lifespan(_: FastAPI) -> AsyncIterator[None]:
    # Uploads a killed API left half-written can never finish: remove them before serving.
    for path in storage.sweep_temp_files(get_settings().files_dir):
        logger.info("removed the unfinished upload %s", path.name)
    yield


def create_app() -> FastAPI:
    app = FastAPI(
        title="ModuLoRA",
        version=modulora.__version__,
        description="Finetune LLMs in 2/3/4 bits and serve them; OpenAI-compatible. Every route but "
        "/health needs `Authorization: Bearer <key>`; errors carry `{error: {message, type, param, code}}`.",
        docs_url=None,
        redoc_url=None,
        lifespan=_lifespan,
    )
    _install_error_handlers(app)
    _include_routers(app)
    _add_docs(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]

    app.add_middleware(_ObserveRequests)
    if (WEB_DIR / "index.html").is_file():
        app.mount("/", _Dashboard(directory=WEB_DIR, html=True), name="dashboard")
    return app


app = create_app()
