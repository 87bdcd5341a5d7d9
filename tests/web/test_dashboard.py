"""The dashboard in headless Chromium against the live API and a real worker (SmolLM2 on CPU).

Each test drives one page the way a person would and saves its screenshot to docs/screenshots/.
Prerequisites a test does not exercise (an uploaded file, a finished job) come from the API. Jobs
train on the native Q4_1 GGUF base of SmolLM2, so no test waits for a quantization.
"""

from __future__ import annotations

import io
import zipfile
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Dashboard, Stack

pytestmark = pytest.mark.slow
BASE_MODEL = "smollm2-135m-instruct"
JOB_TIMEOUT_S = 240


def points(dashboard: Dashboard, chart_id: str) -> int:
    return int(dashboard.page.get_attribute(f"#{chart_id}", "data-points") or 0)


def final_status(dashboard: Dashboard) -> str:
    """Wait until the job page shows a final status; return it (with the job's error, if any)."""
    badge = dashboard.page.wait_for_selector(
        "#job-status .status-succeeded, #job-status .status-failed, #job-status .status-cancelled",
        timeout=JOB_TIMEOUT_S * 1000,
    )
    status = badge.get_attribute("data-status")
    error = dashboard.page.locator("#job-error")
    return f"{status}: {error.inner_text()}" if error.count() else status


@pytest.fixture(scope="module")
def training_file(stack: Stack, chat_dataset) -> dict:
    return stack.upload(chat_dataset)


@pytest.fixture(scope="module")
def trained_model() -> dict[str, str]:
    """Filled by the start-job test with the model it trained; the playground chats with it
    (training on CPU is the slow part, so the module trains one model, through the form)."""
    return {}


def test_sign_in_rejects_a_wrong_key_and_keeps_the_right_one_out_of_the_url(dashboard: Dashboard) -> None:
    page = dashboard.page
    dashboard.screenshot("sign-in")
    page.fill("#api-key", "not-a-key")
    page.click("#sign-in button[type=submit]")
    assert page.wait_for_selector("#sign-in-error:has-text('not accepted')")

    dashboard.sign_in()
    assert dashboard.stack.key not in page.url
    assert page.evaluate("sessionStorage.getItem('modulora.apiKey')") == dashboard.stack.key
    assert page.is_visible("#nav")


def test_upload_invalid_file_shows_the_error_with_its_line_number(
    dashboard: Dashboard, broken_dataset
) -> None:
    dashboard.sign_in()
    dashboard.open("datasets")
    dashboard.page.set_input_files("#file-input", str(broken_dataset))
    error = dashboard.page.wait_for_selector("#upload-error:not([hidden])")
    assert "Line 3" in error.inner_text()
    assert "invalid JSON" in error.inner_text()
    dashboard.screenshot("datasets-invalid-upload")


def test_upload_dataset_shows_report_histogram_and_trained_tokens(dashboard: Dashboard, chat_dataset) -> None:
    page = dashboard.page
    dashboard.sign_in()
    dashboard.open("datasets")
    page.set_input_files("#file-input", str(chat_dataset))
    page.wait_for_selector("#report-rows")
    assert page.inner_text("#report-format") == "messages"
    assert page.inner_text("#report-rows") == "16"
    assert page.inner_text("#report-truncated") == "0"
    assert page.inner_text("#report-errors") == "No errors."
    assert page.locator("#histogram .bucket").count() > 1
    page.wait_for_selector("#preview .sample")
    assert page.locator("#preview .sample").count() == 3
    # The chat template is applied and only the assistant's answer is marked as trained.
    first = page.locator("#preview .sample pre").first
    assert "<|im_start|>user" in first.inner_text()
    assert "<|im_start|>user" not in first.locator("mark.trained").all_inner_texts()[0]
    assert page.evaluate("document.getElementById('upload-progress').value") == 1
    dashboard.screenshot("datasets")

    # A tighter length limit: longer rows are counted, and the preview strikes out the cut tokens.
    page.fill("#report-max-seq-len", "64")
    page.dispatch_event("#report-max-seq-len", "change")
    page.wait_for_selector("#preview .sample .truncated")
    assert int(page.inner_text("#report-truncated")) > 0


def test_new_job_form_estimates_memory_and_flags_a_job_too_big_for_the_gpu(
    dashboard: Dashboard, training_file: dict
) -> None:
    page = dashboard.page
    dashboard.sign_in()
    dashboard.open("new")
    page.wait_for_selector("#estimate-peak")
    page.click("#preset-quality")
    page.select_option("#job-gpu", "16GB")
    page.fill("#job-max_seq_len", "32768")
    page.wait_for_selector("#estimate.too-big")
    assert "Does not fit the 16 GB card" in page.inner_text("#estimate-fit")
    dashboard.screenshot("new-job-too-big")

    page.click("#preset-fits24")
    page.wait_for_selector("#estimate:not(.too-big) #estimate-fit.ok")
    assert "24 GB" in page.inner_text("#estimate-fit")
    dashboard.screenshot("new-job")


def test_start_job_streams_metrics_to_the_charts_until_succeeded(
    dashboard: Dashboard, training_file: dict, trained_model: dict[str, str]
) -> None:
    page = dashboard.page
    dashboard.sign_in()
    dashboard.open("new")
    page.wait_for_selector("#estimate-peak")
    page.select_option("#job-training_file", training_file["id"])
    page.click("#preset-fastest")
    page.select_option("#job-quantization", "gguf")  # SmolLM2 ships as Q4_1 GGUF: no quantization step
    for name, value in {
        "max_seq_len": "128",
        "batch_size": "2",
        "micro_batch_size": "2",
        "max_steps": "3",
        "lora_r": "4",
        "suffix": "web-ui",
    }.items():
        page.fill(f"#job-{name}", value)
    page.click("#submit-job")
    page.wait_for_url("**/#/jobs/ftjob-*")
    job_id = page.url.rsplit("/", 1)[1]

    page.wait_for_function(
        "Number(document.getElementById('chart-loss').dataset.points) >= 2"
        " || document.querySelector('#job-status .status-failed')",
        timeout=JOB_TIMEOUT_S * 1000,
    )
    dashboard.screenshot("job-running")
    assert final_status(dashboard) == "succeeded"
    page.wait_for_selector("#stream-state:has-text('ended')")
    for chart in ("chart-loss", "chart-step-time", "chart-tokens", "chart-memory"):
        assert points(dashboard, chart) == 3, chart
    trained_model["id"] = page.inner_text("#fine-tuned-model")
    page.wait_for_selector("#checkpoint-rows tr td code")
    assert page.locator("#events li").count() >= 2
    with page.expect_download() as download:
        page.click("#download-adapter")
    names = zipfile.ZipFile(io.BytesIO(download.value.path().read_bytes())).namelist()
    assert any(n.endswith("adapter_config.json") for n in names), names
    dashboard.screenshot("job")

    dashboard.open("jobs")
    row = page.wait_for_selector(f"tr[data-job-id='{job_id}'][data-status='succeeded']")
    assert "100%" in row.inner_text()
    dashboard.screenshot("jobs")


def test_playground_streams_a_chat_and_compares_base_with_the_adapter(
    dashboard: Dashboard, trained_model: dict[str, str]
) -> None:
    if "id" not in trained_model:
        pytest.fail("no trained model: the start-job test, which trains it, failed or did not run first")
    model = trained_model["id"]
    page = dashboard.page
    dashboard.sign_in()
    dashboard.open("playground")
    page.fill("#max-tokens", "4")  # CPU decoding: short answers keep the test quick
    page.select_option("#chat-model", model)
    page.fill("#chat-input", "Give one tip for staying healthy.")
    page.click("#chat-send")
    reply = page.wait_for_selector(".message.assistant[data-done='1']", timeout=JOB_TIMEOUT_S * 1000)
    assert reply.inner_text().strip() != "assistant", "the reply is empty"
    assert not page.inner_text("#chat .error")

    page.select_option("#compare-base", BASE_MODEL)
    page.select_option("#compare-adapter-0", model)
    page.fill("#compare-prompt", "Name a primary colour.")
    page.click("#compare-run")
    page.wait_for_function(
        "document.querySelectorAll('#compare-columns .column[data-done]').length === 2",
        timeout=JOB_TIMEOUT_S * 1000,
    )
    columns = page.locator("#compare-columns .column")
    assert columns.nth(0).get_attribute("data-model") == BASE_MODEL
    assert columns.nth(1).get_attribute("data-model") == model
    assert page.locator("#compare-columns .error").count() == 0
    dashboard.screenshot("playground")


def test_cancel_stops_a_running_job(dashboard: Dashboard, stack: Stack, training_file: dict) -> None:
    with stack.api() as client:
        response = client.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": BASE_MODEL,
                "training_file": training_file["id"],
                "hyperparameters": {
                    "quantization": "gguf",
                    "bits": 4,
                    "lora_r": 4,
                    "batch_size": 2,
                    "micro_batch_size": 2,
                    "max_seq_len": 128,
                    "max_steps": 500,
                },
            },
        )
    response.raise_for_status()
    job_id = response.json()["id"]
    page = dashboard.page
    dashboard.sign_in()
    dashboard.open(f"jobs/{job_id}")
    page.wait_for_function(
        "Number(document.getElementById('chart-loss').dataset.points) >= 1"
        " || document.querySelector('#job-status .status-failed')",
        timeout=JOB_TIMEOUT_S * 1000,
    )
    page.click("#cancel-job")
    assert final_status(dashboard) == "cancelled"
    assert points(dashboard, "chart-loss") < 500
    page.wait_for_selector("#checkpoint-rows tr td code")  # the last checkpoint survives the cancel
    dashboard.screenshot("job-cancelled")
