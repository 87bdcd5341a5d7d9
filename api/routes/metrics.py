"""GET /metrics: Prometheus text format, for operators only (their keys' users have `is_operator`,
set by `modulora keys create --operator`): it counts every user's jobs.

Job, file and model counts are read from the database at scrape time, so every API replica
reports the same numbers; request counters are per process (`api.main` counts them).
"""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from api.deps import CurrentUser
from api.errors import APIError, error_responses
from core.db.models import JOB_STATUSES, File, Job, Model
from core.db.session import session_scope

router = APIRouter(tags=["metrics"])
REGISTRY = CollectorRegistry()
REQUESTS = Counter(
    "modulora_http_requests", "HTTP requests", ["method", "route", "status"], registry=REGISTRY
)
LATENCY = Histogram("modulora_http_request_seconds", "HTTP request latency", ["route"], registry=REGISTRY)


class _DatabaseCollector(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        with session_scope() as session:
            by_status = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            files = session.scalar(select(func.count()).select_from(File)) or 0
            models = session.scalar(select(func.count()).select_from(Model)) or 0
        jobs = GaugeMetricFamily("modulora_jobs", "Fine-tuning jobs by status", labels=["status"])
        for status in JOB_STATUSES:
            jobs.add_metric([status], by_status.get(status, 0))
        yield jobs
        yield GaugeMetricFamily("modulora_files", "Uploaded files", value=files)
        yield GaugeMetricFamily("modulora_adapters", "Finished adapters", value=models)


REGISTRY.register(_DatabaseCollector())


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}, **error_responses(403)},
)
def metrics(user: CurrentUser) -> Response:
    """Prometheus metrics (operators' keys only)."""
    if not user.is_operator:
        raise APIError(
            403, "/metrics is for operators (`modulora keys create --operator`)", code="operator_only"
        )
    return Response(generate_latest(REGISTRY), media_type="text/plain; version=0.0.4")
