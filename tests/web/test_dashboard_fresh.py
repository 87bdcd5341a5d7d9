"""A new user's first minutes on a fresh server: nothing converted, no job ever run.

The first upload's report waits, saying why, while the server converts the built-in model's GGUF
once (on CPU, about a minute), then shows everything: token statistics, the histogram, the
preview. The memory and time estimates and the "Fits a 24 GB card" preset work too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import Dashboard

pytestmark = pytest.mark.slow
PREPARE_TIMEOUT_MS = 300_000


def test_a_fresh_servers_first_upload_shows_a_full_report_and_the_estimates_work(
    fresh_dashboard: Dashboard, chat_dataset: Path
) -> None:
    fresh = fresh_dashboard
    assert not (fresh.stack.tmp / "home" / "models").exists()
    page = fresh.page
    fresh.sign_in()
    fresh.open("datasets")
    page.set_input_files("#file-input", str(chat_dataset))
    page.wait_for_selector("#report-status:has-text('being prepared')")
    fresh.audit()
    page.wait_for_selector("#report-rows", timeout=PREPARE_TIMEOUT_MS)
    assert page.inner_text("#report-rows") == "16"
    assert page.inner_text("#report-tokenizer") == "smollm2-135m-instruct"
    minimum, median, p95, maximum = (
        float(v.replace(",", "")) for v in page.inner_text("#report-tokens").split(" / ")
    )
    assert 0 < minimum <= median <= p95 <= maximum
    assert page.locator("#histogram .bucket").count() > 1
    page.wait_for_selector("#preview .sample mark.trained")
    assert page.locator("#preview .sample").count() == 3
    fresh.audit()
    fresh.screenshot("datasets-first-upload")

    fresh.open("new")
    page.wait_for_selector("#estimate-peak")
    assert "≈" in page.inner_text("#estimate-time")
    page.click("#preset-quality")
    page.click("#preset-fits24")
    page.wait_for_selector("#estimate:not(.too-big) #estimate-fit.ok")
    assert "Fits the 24 GB card" in page.inner_text("#estimate-fit")
    fresh.audit()
