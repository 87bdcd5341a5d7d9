"""The dashboard in headless Chromium against the live API and a real worker (SmolLM2 on CPU).

Each test drives pages the way a person would, checks every page it visits with axe-core, and
saves screenshots to docs/screenshots/. Prerequisites a test does not exercise (an uploaded file,
a job to watch) come from the API. Jobs train on the native Q4_1 GGUF base of SmolLM2, so no test
waits for a quantization; the module trains three (through the form, across a server restart, and
one cancelled) and later tests reuse the first two through the `runs` fixture.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest

if TYPE_CHECKING:
    from conftest import Dashboard, Stack

pytestmark = pytest.mark.slow
BASE_MODEL = "smollm2-135m-instruct"
JOB_TIMEOUT_S = 300
RESTART_JOB_STEPS = 3


def points(dashboard: Dashboard, chart_id: str, page: object = None) -> int:
    return int((page or dashboard.page).get_attribute(f"#{chart_id}", "data-points") or 0)


def wait_for_loss_points(dashboard: Dashboard, count: int) -> None:
    """Wait until the job page's loss chart has `count` points, or the job has failed."""
    dashboard.wait_until(
        f"Number(document.getElementById('chart-loss')?.dataset.points) >= {count}"
        " || document.querySelector('#job-status .status-failed')",
        timeout=JOB_TIMEOUT_S * 1000,
    )


def final_status(dashboard: Dashboard, page: object = None, timeout_s: float = JOB_TIMEOUT_S) -> str:
    """Wait until the job page shows a final status; return it (with the job's error, if any)."""
    page = page or dashboard.page
    badge = page.wait_for_selector(
        "#job-status .status-succeeded, #job-status .status-failed, #job-status .status-cancelled",
        timeout=timeout_s * 1000,
    )
    status = badge.get_attribute("data-status")
    error = page.locator("#job-error")
    return f"{status}: {error.inner_text()}" if error.count() else status


@pytest.fixture(scope="module")
def training_file(stack: Stack, chat_dataset: Path) -> dict:
    return stack.upload(chat_dataset)


@pytest.fixture(scope="module")
def runs() -> dict[str, str]:
    """Job ids filled in by the tests that train them: "form" (3 steps, through the New job
    form) and "restart" (3 steps, across an API restart). Later tests chat with and compare them
    (training on CPU is the slow part, so each is trained once)."""
    return {}


def on_path(path: str) -> Callable[[str], bool]:
    """A Playwright URL matcher for one path, whatever the query string."""
    return lambda url: urlsplit(url).path == path


def fulfill(content_type: str, body: str) -> Callable[[object], None]:
    """A Playwright route handler answering 200 with `body`."""
    return lambda route: route.fulfill(content_type=content_type, body=body)


def need(runs: dict[str, str], *names: str) -> list[str]:
    missing = [n for n in names if n not in runs]
    if missing:
        pytest.fail(f"no {missing} run: the test that trains it failed or did not run first")
    return [runs[n] for n in names]


def test_sign_in_keeps_the_key_out_of_the_url_and_signs_in_every_tab(dashboard: Dashboard) -> None:
    page = dashboard.page
    assert page.title() == "Sign in · ModuLoRA"
    assert page.get_attribute("#api-key", "placeholder") == "mlk-…"
    dashboard.audit()
    dashboard.screenshot("sign-in")
    page.fill("#api-key", "not-a-key")
    page.click("#sign-in button[type=submit]")
    assert page.wait_for_selector("#sign-in-error:has-text('not accepted')")

    dashboard.sign_in()
    assert dashboard.stack.key not in page.url
    assert page.evaluate("localStorage.getItem('modulora.apiKey')") == dashboard.stack.key
    assert page.is_visible("#nav") and page.title() == "Jobs · ModuLoRA"
    dashboard.audit()

    # A second tab of the same browser is signed in; signing out in it signs out the first.
    second = dashboard.new_tab()
    second.wait_for_selector("#job-rows")
    second.click("#sign-out")
    second.wait_for_selector("#sign-in")
    page.wait_for_selector("#sign-in")
    assert page.evaluate("localStorage.getItem('modulora.apiKey')") is None


def test_keys_page_creates_a_key_shown_once_and_revokes_it_at_once(dashboard: Dashboard) -> None:
    import httpx

    page = dashboard.page
    dashboard.sign_in()
    dashboard.open("keys")
    page.wait_for_selector("#key-rows tr")
    assert page.title() == "API keys · ModuLoRA"
    assert page.is_visible("#key-rows :text('(this browser)')")
    page.fill("#key-name", "ci")
    page.fill("#key-expiry", "30")
    page.click("#create-key button[type=submit]")
    secret = page.text_content("#new-key-secret")
    assert secret and secret.startswith("mlk-") and dashboard.stack.key not in page.content()
    row = page.locator("#key-rows tr", has_text="ci")
    assert row.locator("td[data-label='State']").text_content() == "active"
    dashboard.audit()
    dashboard.screenshot("keys")
    url = f"{dashboard.stack.url}/v1/models"
    assert httpx.get(url, headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    row.locator("button:has-text('Revoke')").click()
    page.wait_for_selector("#key-rows tr:has-text('ci') td[data-label='State']:has-text('revoked')")
    assert "It stops working at once" in dashboard.dialogs[-1]
    assert httpx.get(url, headers={"Authorization": f"Bearer {secret}"}).status_code == 401
    page.reload()  # a new page load reads the list again: the revoked key stays listed, and this one works
    page.wait_for_selector("#key-rows tr:has-text('revoked')")


def test_upload_invalid_file_shows_the_error_with_its_line_number(
    dashboard: Dashboard, broken_dataset: Path
) -> None:
    dashboard.sign_in()
    dashboard.open("datasets")
    dashboard.page.set_input_files("#file-input", str(broken_dataset))
    error = dashboard.page.wait_for_selector("#upload-error:not([hidden])")
    assert "Line 3" in error.inner_text()
    assert "invalid JSON" in error.inner_text()
    assert "rejected; nothing was stored" in dashboard.page.inner_text("#upload-status")
    dashboard.audit()
    dashboard.screenshot("datasets-invalid-upload")


def test_a_file_of_unknown_schema_lists_its_one_mistake_once_with_the_rows(
    dashboard: Dashboard, tmp_path: Path
) -> None:
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": "a"}) + "\n" for i in range(25)))
    dashboard.sign_in()
    dashboard.open("datasets")
    dashboard.page.set_input_files("#file-input", str(path))
    box = dashboard.page.wait_for_selector("#upload-error:not([hidden])")
    items = box.query_selector_all("li")
    assert len(items) == 1, [i.inner_text() for i in items]
    assert "unknown row format" in items[0].inner_text() and "(20 rows)" in items[0].inner_text()
    dashboard.audit()


def test_a_network_failure_during_upload_says_so(dashboard: Dashboard, chat_dataset: Path) -> None:
    page = dashboard.page
    dashboard.sign_in()
    dashboard.open("datasets")
    page.route(on_path("/v1/files"), lambda route: route.abort("connectionreset"))
    page.set_input_files("#file-input", str(chat_dataset))
    page.wait_for_selector("#upload-error:not([hidden])")
    status = page.inner_text("#upload-status")
    assert "could not be reached" in status and "rejected" not in status
    dashboard.audit()


def test_upload_dataset_shows_report_histogram_and_trained_tokens(
    dashboard: Dashboard, chat_dataset: Path
) -> None:
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
    dashboard.audit()
    dashboard.screenshot("datasets")

    # A tighter length limit: longer rows are counted, and the preview strikes out the cut tokens.
    page.fill("#report-max-seq-len", "64")
    page.dispatch_event("#report-max-seq-len", "change")
    page.wait_for_selector("#preview .sample .truncated")
    assert int(page.inner_text("#report-truncated")) > 0


def test_new_job_form_estimates_memory_and_time_and_presets_reset_what_they_do_not_name(
    dashboard: Dashboard, stack: Stack, training_file: dict, chat_dataset: Path, tmp_path: Path
) -> None:
    # The newest upload looks like held-out data: it is not the default training file.
    validation = tmp_path / "valid.jsonl"
    validation.write_text("\n".join(chat_dataset.read_text().splitlines()[:4]) + "\n")
    stack.upload(validation)
    page = dashboard.page
    dashboard.sign_in()
    dashboard.open("new")
    page.wait_for_selector("#estimate-peak")
    assert page.input_value("#job-training_file") == training_file["id"]
    assert page.inner_text("#job-learning_rate_multiplier-hint") == "× the base learning rate 2e-4 = 2e-4"
    page.fill("#job-learning_rate_multiplier", "2")
    assert page.inner_text("#job-learning_rate_multiplier-hint").endswith("= 4e-4")
    assert "≈" in page.inner_text("#estimate-time")
    assert "estimate" in page.inner_text("#estimate").lower()

    page.click("#preset-quality")
    page.select_option("#job-gpu", "16GB")
    page.fill("#job-max_seq_len", "32768")
    page.wait_for_selector("#estimate.too-big")
    assert "Does not fit the 16 GB card" in page.inner_text("#estimate-fit")
    dashboard.audit()
    dashboard.screenshot("new-job-too-big")

    # "Fastest" names neither the multiplier nor the dropout: both return to their defaults.
    page.fill("#job-lora_dropout", "0.3")
    page.click("#preset-fastest")
    assert page.input_value("#job-learning_rate_multiplier") == "1"
    assert page.input_value("#job-lora_dropout") == "0.05"
    assert page.input_value("#job-n_epochs") == "1"

    page.click("#preset-fits24")
    page.wait_for_selector("#estimate:not(.too-big) #estimate-fit.ok")
    assert "24 GB" in page.inner_text("#estimate-fit")
    dashboard.screenshot("new-job")


def test_the_job_page_and_the_jobs_list_show_a_phase_as_the_worker_reports_it(dashboard: Dashboard) -> None:
    """The contract for the worker's phase reports (docs/dashboard.md): a stream event `phase`
    with {phase, done, total, unit, eta_s, message}, and the job object's `phase`; served here by
    the browser itself (a real job's phases: the validation-file test below)."""
    job_id = "ftjob-phasedemo"
    job = {
        "id": job_id,
        "object": "fine_tuning.job",
        "created_at": 1_700_000_000,
        "finished_at": None,
        "model": BASE_MODEL,
        "fine_tuned_model": None,
        "organization_id": "user-demo",
        "status": "running",
        "hyperparameters": {"quantization": "optq", "bits": 4, "learning_rate_multiplier": 1.0},
        "training_file": "file-demo",
        "validation_file": None,
        "result_files": [],
        "trained_tokens": None,
        "seed": 1,
        "estimated_finish": None,
        "error": None,
        "metadata": None,
    }
    phase = {"phase": "quantizing", "done": 3, "total": 30, "unit": "layer", "eta_s": 42, "message": "q"}
    job["phase"] = phase
    page = dashboard.page
    dashboard.sign_in()
    page.route(
        on_path("/v1/fine_tuning/jobs"),
        fulfill("application/json", json.dumps({"object": "list", "data": [job]})),
    )
    row = page.wait_for_selector(f"tr[data-job-id='{job_id}'] .phase-note")
    assert row.inner_text().strip() == "Quantizing: layer 3 of 30 (10%)"
    dashboard.audit()
    empty = '{"object": "list", "data": []}'
    served = {
        f"/v1/fine_tuning/jobs/{job_id}": ("application/json", json.dumps(job)),
        f"/v1/fine_tuning/jobs/{job_id}/checkpoints": ("application/json", empty),
        f"/v1/dashboard/jobs/{job_id}/messages": ("application/json", empty),
        f"/v1/fine_tuning/jobs/{job_id}/metrics/stream": (
            "text/event-stream",
            f"id: 7\nevent: phase\ndata: {json.dumps(phase)}\n\n",
        ),
    }
    for path, (content_type, body) in served.items():
        page.route(on_path(path), fulfill(content_type, body))
    dashboard.open(f"jobs/{job_id}")
    page.wait_for_selector("#job-phase:has-text('Quantizing: layer 3 of 30 (10%)')")
    assert page.inner_text("#job-phase").endswith("ETA 42s")
    assert page.get_attribute("#job-phase", "data-phase") == "quantizing"
    assert page.evaluate("document.getElementById('phase-progress').value") == pytest.approx(0.1)
    assert page.inner_text("#phase-steps [aria-current='step']").startswith("Quantizing")
    assert page.inner_text("#job-progress-text") == "Training has not started yet"
    dashboard.audit()


def test_start_job_streams_metrics_and_the_page_says_what_was_trained(
    dashboard: Dashboard, training_file: dict, runs: dict[str, str]
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
    assert page.title() == f"Job {job_id} · ModuLoRA"
    assert page.evaluate("document.activeElement.tagName") == "H1"
    # Before the first step the top of the page says what the job is doing.
    phase = page.wait_for_selector("#job-phase[data-phase]")
    assert phase.get_attribute("data-phase") in (
        "queued",
        "quantizing",
        "validating",
        "training",
        "succeeded",
    )
    assert phase.inner_text().strip() and "Loading" not in phase.inner_text()

    wait_for_loss_points(dashboard, 2)
    dashboard.screenshot("job-running")
    assert final_status(dashboard) == "succeeded"
    runs["form"] = job_id
    page.wait_for_selector("#stream-state:has-text('ended')")
    for chart in ("chart-loss", "chart-step-time", "chart-tokens", "chart-memory"):
        assert points(dashboard, chart) == 3, chart
    assert page.inner_text("#job-progress-text") == "Finished at step 3 of 3"
    assert "ETA" not in page.inner_text("#job-progress-text") + page.inner_text("#job-phase")
    assert "step 3" in page.inner_text("#chart-loss-summary")

    # What was trained: hyperparameters, files, learning rate, tokens, duration.
    hyperparameters = {
        row.get_attribute("data-key"): row.query_selector("td").inner_text()
        for row in page.query_selector_all("#hyperparameters tr")
    }
    assert hyperparameters["max_steps"] == "3" and hyperparameters["lora_r"] == "4"
    assert hyperparameters["batch_size"] == "2" and hyperparameters["quantization"].startswith("gguf")
    page.wait_for_selector("#detail-training-file:has-text('alpaca-chat.jsonl')")
    assert training_file["id"] in page.inner_text("#detail-training-file")
    assert page.inner_text("#detail-validation-file") == "none"
    assert page.inner_text("#detail-learning-rate") == "2e-4 (base 2e-4 × multiplier 1)"
    trained_tokens = page.inner_text("#detail-trained-tokens")
    assert trained_tokens.replace(",", "").isdigit() and int(trained_tokens.replace(",", "")) > 0
    assert page.inner_text("#detail-duration") not in ("", "–") and "so far" not in page.inner_text(
        "#detail-duration"
    )
    assert page.inner_text("#detail-suffix") == "web-ui"

    model = page.inner_text("#fine-tuned-model")
    assert model.startswith(f"ft:{BASE_MODEL}:web-ui:")
    assert model in page.inner_text("#snippet-curl") and model in page.inner_text("#snippet-python")
    page.wait_for_selector("#checkpoint-rows tr[data-step='3']")
    names = [
        b.get_attribute("aria-label")
        for b in page.query_selector_all("#checkpoint-rows button, #downloads button")
    ]
    assert len(names) == len(set(names)), names
    assert page.locator("#events li").count() >= 2
    with page.expect_download() as download:
        page.click("#download-adapter")
    archive = zipfile.ZipFile(io.BytesIO(download.value.path().read_bytes())).namelist()
    assert any(n.endswith("adapter_config.json") for n in archive), archive
    with page.expect_download() as download:  # the job trained on a :gguf base
        page.click("#export-gguf-lora")
    assert download.value.path().read_bytes()[:4] == b"GGUF"
    with page.expect_download() as download:
        page.click("#download-step-metrics")
    assert download.value.path().read_text().startswith("step,train_loss,train_accuracy,valid_loss")
    dashboard.audit()
    dashboard.screenshot("job")

    # Clone and edit: the form comes back with this job's settings.
    page.click("#clone-job")
    page.wait_for_selector("#prefill-note:not([hidden])")
    assert page.input_value("#job-suffix") == "web-ui"
    assert page.input_value("#job-max_steps") == "3" and page.input_value("#job-quantization") == "gguf"
    dashboard.audit()

    # The jobs list: base and fine-tuned model apart, the suffix, filters.
    dashboard.open("jobs")
    row = page.wait_for_selector(f"tr[data-job-id='{job_id}'][data-status='succeeded']")
    assert "100%" in row.inner_text() and "web-ui" in row.inner_text()
    assert row.query_selector("[data-label='Base model']").inner_text() == BASE_MODEL
    assert row.query_selector("[data-label='Fine-tuned model']").inner_text() == model
    assert row.query_selector(".eta").inner_text() == "–"
    page.fill("#filter-text", "no-such-run")
    page.wait_for_selector("#jobs-count:has-text('0 of')")
    page.fill("#filter-text", "web-ui")
    page.select_option("#filter-status", "succeeded")
    page.wait_for_selector(f"tr[data-job-id='{job_id}']")
    assert page.locator("#job-rows tr").count() == 1
    page.fill("#filter-text", "")
    page.select_option("#filter-status", "")
    dashboard.audit()
    dashboard.screenshot("jobs")


# Every phase the job page shows, in order, once this runs in the (single-page) app: a
# MutationObserver with old values sees each value of #job-phase's data-phase, even several set in
# one task.
RECORD_PHASES = """() => {
  window.phasesShown = [];
  new MutationObserver((records) => {
    for (const r of records) window.phasesShown.push(r.oldValue);
  }).observe(document, {
    subtree: true, attributes: true, attributeOldValue: true, attributeFilter: ["data-phase"],
  });
}"""


def phases_shown(page: object) -> list[str]:
    """The phases #job-phase has shown so far, consecutive repeats merged."""
    values = [*page.evaluate("window.phasesShown"), page.get_attribute("#job-phase", "data-phase")]
    shown: list[str] = []
    for value in values:
        if value and (not shown or shown[-1] != value):
            shown.append(value)
    return shown


def test_a_job_with_a_validation_file_shows_its_phases_an_eval_curve_and_keeps_the_best_checkpoints(
    dashboard: Dashboard, stack: Stack, training_file: dict, validation_dataset: Path
) -> None:
    validation_file = stack.upload(validation_dataset)
    job = stack.create_job(
        training_file["id"], validation_file["id"], max_steps=2, checkpoint_every=1,
        eval_every=1, keep_checkpoints=1, suffix="validated",
    )  # fmt: skip
    page = dashboard.page
    dashboard.sign_in()
    page.evaluate(RECORD_PHASES)  # the route changes below keep this document
    dashboard.open(f"jobs/{job['id']}")
    phase = page.wait_for_selector(
        "#job-phase[data-phase='training'], #job-phase[data-phase='failed']", timeout=JOB_TIMEOUT_S * 1000
    )
    # "Training: step n of 2 (p%)", or the error of a job that failed before training
    assert phase.inner_text().startswith("Training: step "), page.inner_text("#job-error-box")
    assert final_status(dashboard, timeout_s=2 * JOB_TIMEOUT_S) == "succeeded"  # two evaluations too
    assert phases_shown(page) == ["queued", "validating", "training", "evaluating", "exporting", "succeeded"]
    page.wait_for_selector("#stream-state:has-text('ended')")

    # The eval curve: a validation point at every step, beside the training points.
    summary = page.inner_text("#chart-loss-summary")
    assert "train: 2 values" in summary and "validation: 2 values" in summary

    # Checkpoints: the newest (step 2) plus the best by validation loss, each with both losses,
    # the same on the page, in the API and on disk.
    with stack.api() as client:
        listed = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
        hp = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["hyperparameters"]
    assert (hp["eval_every"], hp["keep_checkpoints"]) == (1, 1)
    valid = {c["step_number"]: c["metrics"]["valid_loss"] for c in listed}
    assert 2 in valid and all(v is not None for v in valid.values())
    assert valid.keys() == {2} or valid[1] < valid[2]  # step 1 stays only as the best
    home = Path(stack.env["MODULORA_HOME"])  # the storage root the worker writes under
    on_disk = {int(p.name[5:]) for p in (home / "jobs" / job["id"] / "checkpoints").glob("step-*")}
    assert on_disk == set(valid)
    for checkpoint in listed:
        row = page.wait_for_selector(f"#checkpoint-rows tr[data-step='{checkpoint['step_number']}']")
        assert row.query_selector("[data-label='Train loss']").inner_text() != "–"
        assert row.query_selector("[data-label='Valid loss']").inner_text() != "–"
    assert page.locator("#checkpoint-rows tr").count() == len(listed)
    hyperparameters = {
        row.get_attribute("data-key"): row.query_selector("td").inner_text()
        for row in page.query_selector_all("#hyperparameters tr")
    }
    assert (hyperparameters["eval_every"], hyperparameters["keep_checkpoints"]) == ("1", "1")
    dashboard.audit()
    dashboard.screenshot("job-validation")


PROXY_PAGE = (
    "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center>"
    "<hr><center>nginx</center></body></html>"
)


def test_a_failing_side_request_keeps_the_jobs_list_and_a_proxy_error_reads_short(
    dashboard: Dashboard, runs: dict[str, str]
) -> None:
    (job_id,) = need(runs, "form")
    page = dashboard.page
    dashboard.sign_in()
    page.wait_for_selector(f"tr[data-job-id='{job_id}']")
    proxy = {"status": 502, "content_type": "text/html", "body": PROXY_PAGE}
    page.route(on_path("/v1/dashboard/jobs/progress"), lambda route: route.fulfill(**proxy))
    page.wait_for_selector("#jobs-note:has-text('502')")
    note = page.inner_text("#jobs-note")
    assert "Bad Gateway" in note and "<" not in note
    assert page.locator(f"tr[data-job-id='{job_id}']").count() == 1
    # The list itself failing keeps the last one on screen, and says so.
    page.route(on_path("/v1/fine_tuning/jobs"), lambda route: route.fulfill(**proxy))
    page.wait_for_selector("#jobs-error:has-text('showing the last list')")
    assert page.locator(f"tr[data-job-id='{job_id}']").count() == 1
    dashboard.audit()


def test_job_page_survives_a_server_restart_and_ends_on_the_final_step(
    dashboard: Dashboard, stack: Stack, training_file: dict, runs: dict[str, str]
) -> None:
    job = stack.create_job(training_file["id"], max_steps=RESTART_JOB_STEPS, suffix="restart")
    page = dashboard.page
    dashboard.sign_in()
    dashboard.open(f"jobs/{job['id']}")
    wait_for_loss_points(dashboard, 1)
    seen = points(dashboard, "chart-loss")
    assert seen < RESTART_JOB_STEPS, "the job finished before the restart: make it longer"
    other = dashboard.new_tab()  # a second tab, on another page while the server is up
    dashboard.open("datasets", other)
    other.wait_for_selector("#file-rows tr")

    stack.kill_api()
    page.wait_for_selector("#stream-state:has-text('reconnecting'), #stream-state:has-text('unreachable')")
    # Opened while the server is down: the page says so and keeps trying.
    other.evaluate(f"window.location.hash = '#/jobs/{job['id']}'")
    other.wait_for_selector("#job-load-error:has-text('Retrying')")
    stack.start_api()

    assert final_status(dashboard) == "succeeded"
    runs["restart"] = job["id"]
    page.wait_for_selector("#stream-state:has-text('ended')", timeout=60_000)
    assert points(dashboard, "chart-loss") == RESTART_JOB_STEPS
    assert (
        page.inner_text("#job-progress-text")
        == f"Finished at step {RESTART_JOB_STEPS} of {RESTART_JOB_STEPS}"
    )
    dashboard.audit()
    assert final_status(dashboard, other) == "succeeded"
    other.wait_for_selector("#stream-state:has-text('ended')", timeout=60_000)
    assert points(dashboard, "chart-loss", other) == RESTART_JOB_STEPS
    assert other.locator("#job-load-error").is_hidden()
    dashboard.audit(other)


def test_compare_overlays_two_runs_on_one_loss_chart(dashboard: Dashboard, runs: dict[str, str]) -> None:
    first, second = need(runs, "form", "restart")
    page = dashboard.page
    dashboard.sign_in()
    for job_id in (first, second):
        page.check(f"tr[data-job-id='{job_id}'] .select-job")
    dashboard.audit()
    page.click("#compare-selected")
    page.wait_for_url(f"**/#/compare/{first},{second}")
    dashboard.wait_until("document.getElementById('chart-compare')?.dataset.series === '2'")
    assert points(dashboard, "chart-compare") == 3  # both runs' steps, 1 to 3, on one axis
    legend = page.inner_text("#chart-compare .u-legend")
    assert "web-ui" in legend and "restart" in legend
    assert page.title() == "Compare runs · ModuLoRA"
    table = page.inner_text("#compare-table")
    assert "web-ui" in table and "restart" in table and "Last train loss" in table

    page.fill("#compare-smoothing", "0.6")
    page.dispatch_event("#compare-smoothing", "input")
    page.check("#compare-log-scale")
    page.wait_for_selector("#chart-compare canvas")
    assert page.inner_text("#compare-smoothing-value") == "0.60"
    dashboard.audit()
    dashboard.screenshot("compare")


def test_playground_chats_with_enter_a_system_prompt_and_stop_then_compares(
    dashboard: Dashboard, runs: dict[str, str]
) -> None:
    (job_id,) = need(runs, "form")
    page = dashboard.page
    dashboard.sign_in()
    with dashboard.stack.api() as client:
        model = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["fine_tuned_model"]
    dashboard.open("playground")
    page.fill("#max-tokens", "4")  # CPU decoding: short answers keep the test quick
    page.select_option("#chat-model", model)
    page.fill("#system-prompt", "You are terse.")
    page.fill("#chat-input", "Give one tip")
    page.keyboard.press("Shift+Enter")  # a new line, not a send
    page.keyboard.type("for staying healthy.")
    assert page.locator(".message").count() == 0
    with page.expect_request("**/v1/chat/completions") as sent:
        page.keyboard.press("Enter")
    messages = json.loads(sent.value.post_data)["messages"]
    assert messages == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Give one tip\nfor staying healthy."},
    ]
    reply = page.wait_for_selector(".message.assistant[data-done='1']", timeout=JOB_TIMEOUT_S * 1000)
    assert reply.inner_text().strip() != "assistant", "the reply is empty"
    assert not page.inner_text("#chat .error")
    dashboard.audit()

    # The pickers start on the newest adapters; earlier tests trained several, so clear the rest.
    page.select_option("#compare-base", BASE_MODEL)
    page.select_option("#compare-adapter-0", model)
    for picker in page.locator("#compare form select[id^='compare-adapter-']").all()[1:]:
        picker.select_option("")
    page.fill("#compare-prompt", "Name a primary colour.")
    page.click("#compare-run")
    dashboard.wait_until(
        "[...document.querySelectorAll('#compare-columns .column')].every((c) => c.dataset.done)"
        " && document.querySelector('#compare-columns .column') !== null",
        timeout=JOB_TIMEOUT_S * 1000,
    )
    columns = page.locator("#compare-columns .column")
    assert [columns.nth(i).get_attribute("data-model") for i in range(columns.count())] == [BASE_MODEL, model]
    assert page.locator("#compare-columns .error").count() == 0
    dashboard.screenshot("playground")

    # Stop: the reply ends where it is and the conversation can go on.
    page.fill("#max-tokens", "48")
    page.fill("#chat-input", "Count from one to twenty.")
    page.keyboard.press("Enter")
    page.wait_for_selector("#chat-stop:not([hidden])")
    page.click("#chat-stop")
    page.wait_for_selector(".message.assistant:last-child[data-done='1']")
    assert page.locator(".message.assistant:last-child .stopped").count() == 1
    assert page.is_enabled("#chat-send") and page.is_hidden("#chat-stop")


def test_cancel_asks_first_then_stops_a_running_job(
    dashboard: Dashboard, stack: Stack, training_file: dict
) -> None:
    job = stack.create_job(training_file["id"], max_steps=500)
    page = dashboard.page
    dashboard.sign_in()
    dashboard.open(f"jobs/{job['id']}")
    wait_for_loss_points(dashboard, 1)
    assert "ETA" in page.inner_text("#job-progress-text")
    dashboard.dismiss_dialogs = 1
    page.click("#cancel-job")
    assert dashboard.dialogs and f"Cancel job {job['id']}?" in dashboard.dialogs[-1]
    assert page.inner_text("#job-status") == "running"  # dismissed: nothing happened
    page.click("#cancel-job")  # accepted this time
    assert final_status(dashboard) == "cancelled"
    assert points(dashboard, "chart-loss") < 500
    assert "ETA" not in page.inner_text("#job-progress-text")
    page.wait_for_selector("#checkpoint-rows tr[data-step]")  # the last checkpoint survives the cancel
    dashboard.audit()
    dashboard.screenshot("job-cancelled")

    # A finished job can be deleted, after a confirmation, with everything it made.
    page.click("#delete-job")
    page.wait_for_url("**/#/jobs")
    page.wait_for_selector("#job-rows tr")
    assert page.locator(f"tr[data-job-id='{job['id']}']").count() == 0
    dashboard.audit()
    with stack.api() as client:
        assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").status_code == 404


def test_every_page_fits_a_phone_without_horizontal_overflow(
    phone: Dashboard, runs: dict[str, str], training_file: dict
) -> None:
    first, second = need(runs, "form", "restart")
    page = phone.page
    width = 390

    def check(name: str, ready: str) -> None:
        page.wait_for_selector(ready)
        size = phone.overflow()
        assert size["scrollWidth"] <= width, f"{name}: {size}"
        phone.audit()
        phone.screenshot(f"{name}-phone")

    check("sign-in", "#sign-in")
    phone.sign_in()
    # The nav collapses behind a menu button; opened, every link and Sign out are on screen.
    assert page.is_hidden("#sign-out")
    page.click("#nav-toggle")
    box = page.locator("#sign-out").bounding_box()
    assert box and box["x"] + box["width"] <= width
    check("nav", "#nav.open")
    page.click("#nav a[data-page='jobs']")
    check("jobs", f"tr[data-job-id='{first}']")
    phone.open("datasets")
    page.click(f"tr[data-file-id='{training_file['id']}'] td[data-label='File'] button")
    check("datasets", "#preview .sample")
    phone.open("new")
    check("new-job", "#estimate-peak")
    phone.open(f"jobs/{first}")
    check("job", "#stream-state:has-text('ended')")
    chart = page.locator("#chart-loss canvas").bounding_box()
    assert chart and chart["x"] + chart["width"] <= width
    phone.open(f"compare/{first},{second}")
    phone.wait_until("document.getElementById('chart-compare')?.dataset.series === '2'")
    check("compare", "#compare-table")
    phone.open("playground")
    check("playground", "#chat-log")
    phone.open("keys")
    check("keys", "#key-rows tr")
