"""The worker's phase reports (core/phases.py): the quantizer's layer-by-layer progress, throttled,
with the time left; an unknown phase is refused."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from core.db.models import JobEvent
from core.db.session import session_scope
from core.phases import phase_data
from modulora.quant import QuantConfig
from modulora.quantize import quantize_
from tests.api.conftest import Service
from tests.utils.tiny_lm import single_thread, tiny_llama  # noqa: F401
from tests.worker.test_checkpoints import new_job
from worker.tasks.train import QuantizeProgress


def phases(job_id: str) -> list[dict]:
    with session_scope() as session:
        data = session.scalars(select(JobEvent.data).where(JobEvent.job_id == job_id).order_by(JobEvent.pk))
        return [d for d in data if d and "phase" in d]


def test_quantizing_reports_every_layer_of_the_real_quantizer_with_the_time_left(service: Service) -> None:
    job, _ = new_job(service)
    quantize_(
        tiny_llama(), QuantConfig(method="rtn", bits=4, group_size=32), progress=QuantizeProgress(job.id, 0)
    )
    reported = [p for p in phases(job.id) if p["phase"] == "quantizing"]
    assert [(p["done"], p["total"], p["unit"]) for p in reported] == [(1, 2, "layer"), (2, 2, "layer")]
    assert reported[0]["message"] == "Quantizing layer 1 of 2"
    assert reported[0]["eta_s"] >= 0 and reported[1]["eta_s"] == 0


def test_quantizing_reports_the_first_and_last_layer_and_between_them_at_most_every_interval(
    service: Service,
) -> None:
    job, _ = new_job(service)
    progress = QuantizeProgress(job.id, every_s=3600)
    for layer in range(1, 31):
        progress(layer, 30)
    assert [p["done"] for p in phases(job.id) if p["phase"] == "quantizing"] == [1, 30]


def test_an_unknown_phase_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match="'warming up' is not one of"):
        phase_data("warming up", "?")
