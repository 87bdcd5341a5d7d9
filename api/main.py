"""The FastAPI app: error envelope, every router in `api/routes/`, the dashboard at `/`.

Run with `modulora serve` (or `uvicorn api.main:app`). Nothing here imports torch: training runs
in the workers, and the inference engine imports it lazily on first use.
"""

from __future__ import annotations

import importlib
import pkgutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

import modulora
from api import routes
from api.errors import APIError
from api.routes.metrics import LATENCY, REQUESTS

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
_HTTP_TYPES = {401: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error"}


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
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
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
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _envelope(
            exc.status_code,
            str(exc.detail),
            type=_HTTP_TYPES.get(exc.status_code, "api_error"),
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return _envelope(500, f"Internal error: {type(exc).__name__}", type="server_error")


def _include_routers(app: FastAPI) -> None:
    """Every module in api/routes/ that defines `router` (new route files need no edit here)."""
    for module_info in sorted(pkgutil.iter_modules(routes.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{routes.__name__}.{module_info.name}")
        router = getattr(module, "router", None)
        if router is not None:
            app.include_router(router)


def create_app() -> FastAPI:
    app = FastAPI(
        title="ModuLoRA",
        version=modulora.__version__,
        description="Finetune LLMs in 2/3/4 bits and serve them; OpenAI-compatible.",
    )
    _install_error_handlers(app)
    _include_routers(app)

    @app.middleware("http")
    async def _count_requests(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        REQUESTS.labels(request.method, route, str(response.status_code)).inc()
        LATENCY.labels(route).observe(time.perf_counter() - started)
        return response

    if (WEB_DIR / "index.html").is_file():
        app.mount("/", StaticFiles(directory=WEB_DIR, html=True), name="dashboard")
    return app


app = create_app()
