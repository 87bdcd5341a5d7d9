// One job: live charts fed by the SSE metrics stream, progress/ETA, events, checkpoints, cancel,
// adapter download. The stream is read with fetch so the API key rides in a header.

import * as api from "../api.js";
import { LiveChart } from "../charts.js";
import { fill, formatBytes, formatDuration, formatNumber, formatTime, h, statusBadge } from "../dom.js";

const FINAL = new Set(["succeeded", "failed", "cancelled"]);
const POLL_MS = 3000;
const RECONNECT_MS = 1000;
const POLLS_AFTER_END = 5;

// Event ids are "ftevent-<n>" with n increasing: order by n, timestamps tie within a second.
const eventNumber = (event) => Number(event.id.split("-").pop()) || 0;
const gib = (bytes) => bytes / 2 ** 30;
const fmtGib = (v) => `${v.toFixed(2)} GiB`;
// Three significant digits below 100 so that small rates do not collapse onto one tick label.
const fmtRate = (v) => (v >= 100 ? v.toFixed(0) : String(Number(v.toPrecision(3))));

/** Metrics events differ in naming between producers; read them into one shape. */
export function readMetrics(payload) {
  const m = payload?.data && typeof payload.data === "object" ? payload.data : payload;
  const first = (...names) => names.map((n) => m?.[n]).find((v) => v !== undefined && v !== null) ?? null;
  return {
    step: first("step"),
    totalSteps: first("total_steps"),
    loss: first("loss", "train_loss"),
    valLoss: first("val_loss", "valid_loss", "validation_loss"),
    stepTime: first("step_time_s"),
    tokensPerS: first("tokens_per_s"),
    allocated: first("memory_allocated_bytes"),
    peak: first("memory_peak_bytes"),
    progress: first("progress"),
    etaS: first("eta_s"),
  };
}

export function renderJob(main, jobId) {
  const abort = new AbortController();
  let job = null;
  let pollTimer = null;
  let cancelRequested = false;
  let pollsAfterEnd = 0;

  const charts = {
    loss: new LiveChart("chart-loss", "Loss", [{ label: "train" }, { label: "validation", points: true }]),
    stepTime: new LiveChart("chart-step-time", "Step time (s)", [{ label: "step time", format: (v) => `${v.toFixed(1)}s` }]),
    tokens: new LiveChart("chart-tokens", "Tokens / s", [{ label: "tokens/s", format: fmtRate }]),
    memory: new LiveChart("chart-memory", "Memory", [{ label: "allocated", format: fmtGib }, { label: "peak", format: fmtGib }]),
  };
  const head = h("div", { class: "job-head" });
  const progressBar = h("progress", { id: "job-progress", max: 1, value: 0 });
  const progressText = h("span", { id: "job-progress-text", class: "muted" });
  const latest = h("dl", { class: "facts", id: "job-latest" });
  const eventsList = h("ol", { id: "events", class: "events" });
  const checkpointRows = h("tbody", { id: "checkpoint-rows" });
  const downloads = h("div", { id: "downloads" });
  const streamState = h("span", { id: "stream-state", class: "muted" }, "connecting…");

  main.append(
    head,
    h("section", { class: "card" }, h("div", {}, progressBar, " ", progressText), h("div", {}, streamState), latest),
    h("section", { class: "charts" }, Object.values(charts).map((c) => c.el)),
    h("section", { class: "card" }, h("h2", {}, "Adapter"), downloads),
    h("section", { class: "card" }, h("h2", {}, "Checkpoints"),
      h("table", {}, h("thead", {}, h("tr", {}, ["Step", "Checkpoint", "Train loss", "Validation loss", ""].map((t) => h("th", {}, t)))), checkpointRows)),
    h("section", { class: "card" }, h("h2", {}, "Events"), eventsList),
  );
  Object.values(charts).forEach((c) => c.mount());

  function onMetrics(payload) {
    const m = readMetrics(payload);
    if (m.step === null) return;
    charts.loss.add(m.step, [m.loss, m.valLoss]);
    charts.stepTime.add(m.step, [m.stepTime]);
    charts.tokens.add(m.step, [m.tokensPerS]);
    charts.memory.add(m.step, [m.allocated === null ? null : gib(m.allocated), m.peak === null ? null : gib(m.peak)]);
    if (m.progress !== null) progressBar.value = m.progress;
    progressText.textContent = `step ${m.step}${m.totalSteps ? ` of ${m.totalSteps}` : ""} · ETA ${formatDuration(m.etaS)}`;
    fill(
      latest,
      [["Loss", formatNumber(m.loss, 4)], ["Step time", m.stepTime === null ? "–" : `${m.stepTime.toFixed(2)} s`],
        ["Tokens/s", m.tokensPerS === null ? "–" : m.tokensPerS.toFixed(0)],
        ["Memory (allocated / peak)", `${formatBytes(m.allocated)} / ${formatBytes(m.peak)}`]]
        .map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]),
    );
  }

  // Read the stream until the job ends; reconnect with Last-Event-ID so nothing is missed twice.
  async function followStream() {
    let lastEventId = null;
    while (!abort.signal.aborted) {
      try {
        streamState.textContent = "live";
        await api.readEventStream(`/v1/fine_tuning/jobs/${jobId}/metrics/stream`, {
          signal: abort.signal,
          lastEventId,
          onEvent: ({ event, data, id }) => {
            if (id) lastEventId = id;
            if (event === "status" || data?.status) refreshJob();
            else onMetrics(data);
          },
        });
      } catch (err) {
        if (abort.signal.aborted) return;
        streamState.textContent = `stream interrupted (${err.message}), reconnecting…`;
      }
      await refreshJob();
      if (job && FINAL.has(job.status)) {
        streamState.textContent = "stream closed: the job has ended";
        return;
      }
      await new Promise((resolve) => setTimeout(resolve, RECONNECT_MS));
    }
  }

  async function refreshJob() {
    job = await api.getJob(jobId);
    renderHead();
    if (job.status === "succeeded") progressBar.value = 1;
  }

  function renderHead() {
    const cancellable = !FINAL.has(job.status);
    fill(
      head,
      h("div", {}, h("h1", {}, "Job ", h("code", {}, job.id)), h("p", { class: "muted" }, `${job.model} · created ${formatTime(job.created_at)}`)),
      h("div", { class: "job-actions" },
        h("span", { id: "job-status" }, statusBadge(job.status)),
        cancellable
          ? h("button", { id: "cancel-job", class: "danger", onclick: cancel, disabled: cancelRequested }, cancelRequested ? "Cancelling…" : "Cancel")
          : null),
      job.error ? h("p", { class: "error-box", id: "job-error" }, `${job.error.code ?? "error"}: ${job.error.message}`) : null,
    );
    fill(
      downloads,
      job.fine_tuned_model
        ? [h("p", {}, "Model ", h("code", { id: "fine-tuned-model" }, job.fine_tuned_model), " · ",
            h("a", { href: "#/playground", onclick: () => sessionStorage.setItem("modulora.chatModel", job.fine_tuned_model) }, "open in the playground")),
          h("button", { id: "download-adapter", onclick: () => api.download(`/v1/dashboard/models/${encodeURIComponent(job.fine_tuned_model)}/download`, `${job.fine_tuned_model}.zip`) }, "Download adapter (.zip)")]
        : h("p", { class: "muted" }, "The adapter is available once the job succeeds."),
    );
  }

  // The worker stops at the next step boundary; until the state changes the button says so.
  async function cancel() {
    cancelRequested = true;
    renderHead();
    try {
      job = await api.cancelJob(jobId);
      renderHead();
    } catch (err) {
      cancelRequested = false;
      renderHead();
      head.querySelector("#cancel-job").textContent = `Cancel failed: ${err.message}`;
    }
  }

  async function pollSideTables() {
    try {
      const [latestJob, events, checkpoints] = await Promise.all([api.getJob(jobId), api.listEvents(jobId), api.listCheckpoints(jobId)]);
      if (latestJob.status !== job.status) {
        job = latestJob; // queued -> running arrives here; the stream carries steps, not states
        renderHead();
      }
      fill(eventsList, events.filter((e) => e.type !== "metrics").sort((a, b) => eventNumber(a) - eventNumber(b)).map((e) =>
        h("li", { class: `event level-${e.level}` }, h("time", {}, formatTime(e.created_at)), " ", e.message)));
      fill(checkpointRows, checkpoints.length ? null : h("tr", {}, h("td", { colspan: 5, class: "muted" }, "No checkpoints yet.")),
        checkpoints.map((c) => h("tr", {},
          h("td", {}, c.step_number), h("td", {}, h("code", {}, c.fine_tuned_model_checkpoint ?? c.id)),
          h("td", {}, formatNumber(c.metrics?.train_loss, 4)), h("td", {}, formatNumber(c.metrics?.valid_loss, 4)),
          h("td", {}, h("button", { class: "link", onclick: () => api.download(`/v1/dashboard/checkpoints/${c.id}/download`, `${c.id}.zip`) }, "download")))));
    } catch (err) {
      fill(eventsList, h("li", { class: "error" }, err.message));
    }
    // The worker writes its last checkpoint and events around the final state: keep looking a little.
    if (job && FINAL.has(job.status)) pollsAfterEnd += 1;
    if (!abort.signal.aborted && pollsAfterEnd <= POLLS_AFTER_END) pollTimer = setTimeout(pollSideTables, POLL_MS);
  }

  refreshJob()
    .then(() => {
      followStream();
      pollSideTables();
    })
    .catch((err) => fill(head, h("p", { class: "error" }, `Could not load job ${jobId}: ${err.message}`)));

  return () => {
    abort.abort();
    clearTimeout(pollTimer);
    Object.values(charts).forEach((c) => c.destroy());
  };
}
