// One job: what it is doing now (phase, progress, ETA), live charts fed by the SSE metrics stream,
// what was trained (hyperparameters, files, learning rate, tokens, duration), the model with ready
// snippets, checkpoints, events; cancel, clone, compare, delete. The stream is read with fetch so
// the API key rides in a header, and it survives server restarts: every failure is retried with
// backoff until the job has ended and the server has sent its last step.

import * as api from "../api.js";
import { chartControls, LiveChart } from "../charts.js";
import {
  copyButton,
  fill,
  formatBytes,
  formatCount,
  formatDuration,
  formatNumber,
  formatRate,
  formatTime,
  h,
  sleep,
  statusBadge,
} from "../dom.js";
import { currentPhase, phaseFromMessage, phaseStates, phaseText, readPhase } from "../phases.js";

const FINAL = new Set(["succeeded", "failed", "cancelled"]);
const POLL_MS = 3000;
const RETRY_MIN_MS = 1000;
const RETRY_MAX_MS = 8000;
const POLLS_AFTER_END = 5;
const HYPERPARAMETERS = [
  ["n_epochs", "Epochs"],
  ["batch_size", "Batch size"],
  ["micro_batch_size", "Micro-batch size"],
  ["learning_rate_multiplier", "Learning-rate multiplier"],
  ["max_seq_len", "Max sequence length"],
  ["max_steps", "Max steps"],
  ["checkpoint_every", "Checkpoint every (steps)"],
  ["eval_every", "Validate every (steps)"],
  ["keep_checkpoints", "Checkpoints kept (newest, plus the best)"],
  ["gradient_checkpointing", "Gradient checkpointing"],
  ["quantization", "Quantization"],
  ["bits", "Bits"],
  ["group_size", "Group size"],
  ["lora_r", "LoRA rank r"],
  ["lora_alpha", "LoRA alpha"],
  ["lora_dropout", "LoRA dropout"],
  ["lora_targets", "LoRA targets"],
];

const FINAL_TEXT = {
  succeeded: "Succeeded: the model is ready.",
  failed: "Failed: the error is shown above.",
  cancelled: "Cancelled: the last checkpoint is kept.",
};

const gib = (bytes) => bytes / 2 ** 30;
const fmtGib = (v) => `${v.toFixed(2)} GiB`;
// Three significant digits below 100 so that small rates do not collapse onto one tick label.
const fmtRate = (v) => (v >= 100 ? v.toFixed(0) : String(Number(v.toPrecision(3))));
const fmtLoss = (v) => String(Number(v.toPrecision(4)));

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
    trainedTokens: first("trained_tokens"),
    learningRate: first("learning_rate"),
    allocated: first("memory_allocated_bytes"),
    peak: first("memory_peak_bytes"),
    progress: first("progress"),
    etaS: first("eta_s"),
  };
}

function hyperparameterValue(key, value) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "boolean") return value ? "on" : "off";
  if (Array.isArray(value)) return value.join(", ");
  if (key === "group_size" && value === -1) return "per channel";
  if (key === "quantization" && value === "gguf") return "gguf (the file's own blocks)";
  return String(value);
}

export function renderJob(main, jobId) {
  const abort = new AbortController();
  let job = null;
  let baseLearningRate = null;
  let files = {};
  let metrics = null; // the latest step's readMetrics()
  let reportedPhase = null; // the latest phase the worker reported or a log message implied
  let reportedPhaseAt = 0; // its event number: the stream and the log poll may deliver it in either order
  let lastMessage = 0;
  let streamDone = false;
  let cancelRequested = false;
  let pollTimer = null;
  let pollsAfterEnd = 0;
  let renderedActions = "";

  const charts = {
    loss: new LiveChart("chart-loss", "Loss", [{ label: "train", format: fmtLoss }, { label: "validation", points: true, format: fmtLoss }]),
    stepTime: new LiveChart("chart-step-time", "Step time (s)", [{ label: "step time", format: (v) => `${v.toFixed(2)}s` }]),
    tokens: new LiveChart("chart-tokens", "Tokens / s", [{ label: "tokens/s", format: fmtRate }]),
    memory: new LiveChart("chart-memory", "Memory", [{ label: "allocated", format: fmtGib }, { label: "peak", format: fmtGib }]),
  };

  const subtitle = h("p", { class: "muted", id: "job-subtitle" });
  const statusBox = h("span", { id: "job-status", role: "status" });
  const actions = h("div", { class: "job-actions" });
  const errorBox = h("div", { id: "job-error-box" });
  const loadError = h("p", { class: "error-box", id: "job-load-error", role: "alert", hidden: true });
  const phaseLabel = h("p", { id: "job-phase", class: "phase", "aria-live": "polite" }, "Loading the job…");
  const phaseProgress = h("progress", { id: "phase-progress", max: 1, value: 0, "aria-label": "Progress of the current phase", hidden: true });
  const phaseList = h("ol", { class: "phase-steps", id: "phase-steps", "aria-label": "Phases" });
  const progressBar = h("progress", { id: "job-progress", max: 1, value: 0, "aria-label": "Training progress" });
  const progressText = h("span", { id: "job-progress-text", "aria-live": "polite" });
  const streamState = h("p", { id: "stream-state", class: "muted" }, "connecting…");
  const latest = h("dl", { class: "facts", id: "job-latest" });
  const details = h("dl", { class: "facts", id: "job-details" });
  const hyperparameters = h("tbody", { id: "hyperparameters" });
  const modelBox = h("div", { id: "downloads" });
  const checkpointRows = h("tbody", { id: "checkpoint-rows" });
  const eventsList = h("ol", { id: "events", class: "events", tabindex: 0, "aria-label": "Events, oldest first" });

  main.append(
    h("div", { class: "job-head" },
      h("div", { class: "job-title" }, h("h1", {}, "Job ", h("code", {}, jobId)), subtitle),
      h("div", { class: "job-status-actions" }, statusBox, actions),
      errorBox),
    loadError,
    h("section", { class: "card", "aria-labelledby": "progress-heading" },
      h("h2", { id: "progress-heading" }, "Progress"),
      phaseLabel, phaseProgress, phaseList,
      h("div", { class: "progress-line" }, progressBar, " ", progressText),
      streamState, latest),
    h("section", { class: "metrics", "aria-labelledby": "metrics-heading" },
      h("div", { class: "section-head" }, h("h2", { id: "metrics-heading" }, "Metrics"), chartControls(Object.values(charts), "job-charts")),
      h("div", { class: "charts" }, Object.values(charts).map((c) => c.el))),
    h("section", { class: "card", "aria-labelledby": "run-heading" },
      h("h2", { id: "run-heading" }, "What was trained"), details,
      h("h3", {}, "Hyperparameters"),
      h("table", { class: "compact kv", id: "hyperparameter-table" },
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Setting"), h("th", { scope: "col" }, "Value"))),
        hyperparameters)),
    h("section", { class: "card", "aria-labelledby": "model-heading" }, h("h2", { id: "model-heading" }, "Model"), modelBox),
    h("section", { class: "card", "aria-labelledby": "checkpoints-heading" },
      h("h2", { id: "checkpoints-heading" }, "Checkpoints"),
      h("div", { class: "table-wrap" },
        h("table", { class: "compact checkpoints" },
          h("thead", {}, h("tr", {}, ["Step", "Train loss", "Valid loss", "Checkpoint", "Actions"].map((t) => h("th", { scope: "col" }, t)))),
          checkpointRows))),
    h("section", { class: "card", "aria-labelledby": "events-heading" }, h("h2", { id: "events-heading" }, "Events"), eventsList),
  );
  Object.values(charts).forEach((c) => c.mount());

  // ---- stream --------------------------------------------------------------------------------

  function onMetrics(payload) {
    const m = readMetrics(payload);
    if (m.step === null) return;
    charts.loss.add(m.step, [m.loss, m.valLoss]);
    charts.stepTime.add(m.step, [m.stepTime]);
    charts.tokens.add(m.step, [m.tokensPerS]);
    charts.memory.add(m.step, [m.allocated === null ? null : gib(m.allocated), m.peak === null ? null : gib(m.peak)]);
    if (metrics === null || m.step >= metrics.step) metrics = m;
    renderProgress();
    fill(
      latest,
      [["Loss", formatNumber(metrics.loss, 4)], ["Step time", metrics.stepTime === null ? "–" : `${metrics.stepTime.toFixed(2)} s`],
        ["Tokens/s", metrics.tokensPerS === null ? "–" : metrics.tokensPerS.toFixed(0)],
        ["Memory (allocated / peak)", `${formatBytes(metrics.allocated)} / ${formatBytes(metrics.peak)}`]]
        .map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]),
    );
  }

  /** A phase report, kept only if no later one (by event number) has arrived by the other route. */
  function notePhase(phase, eventNumber) {
    if (!phase || eventNumber < reportedPhaseAt) return false;
    reportedPhase = phase;
    reportedPhaseAt = eventNumber;
    return true;
  }

  function onPhase(data, id) {
    if (notePhase(readPhase(data), Number(id) || reportedPhaseAt)) renderProgress();
  }

  // Read the stream until the server says the job is done; after any failure (a dropped
  // connection, a server restart, a proxy error) refresh the job and reconnect with Last-Event-ID
  // so the missed steps are replayed, waiting longer after each failure in a row.
  async function followStream() {
    let lastEventId = null;
    let delay = RETRY_MIN_MS;
    while (!abort.signal.aborted && !streamDone) {
      try {
        await api.readEventStream(`/v1/fine_tuning/jobs/${jobId}/metrics/stream`, {
          signal: abort.signal,
          lastEventId,
          onOpen: () => {
            delay = RETRY_MIN_MS;
            streamState.textContent = "live";
          },
          onEvent: ({ event, data, id }) => {
            if (id) lastEventId = id;
            if (event === "done") streamDone = true;
            else if (event === "phase") onPhase(data, id);
            else if (event === "metrics") onMetrics(data);
          },
        });
      } catch (err) {
        if (abort.signal.aborted) return;
        streamState.textContent = `stream interrupted (${err.message}); reconnecting in ${delay / 1000}s…`;
      }
      try {
        await refreshJob();
      } catch (err) {
        if (abort.signal.aborted) return;
        streamState.textContent = `server unreachable (${err.message}); retrying in ${delay / 1000}s…`;
      }
      if (streamDone) break;
      await sleep(delay);
      delay = Math.min(2 * delay, RETRY_MAX_MS);
    }
    if (streamDone) streamState.textContent = "stream closed: the job has ended";
  }

  async function refreshJob() {
    const latestJob = await api.getJob(jobId);
    const changed = !job || latestJob.status !== job.status || latestJob.fine_tuned_model !== job.fine_tuned_model;
    job = latestJob;
    if (changed) {
      renderHead();
      renderModel();
    }
    renderProgress();
    renderDetails();
  }

  // ---- rendering -----------------------------------------------------------------------------

  function renderHead() {
    fill(subtitle, job.model, job.fine_tuned_model ? [" → ", h("code", {}, job.fine_tuned_model)] : null,
      ` · created ${formatTime(job.created_at)}`);
    fill(statusBox, statusBadge(job.status));
    const key = `${job.status}/${cancelRequested}`;
    if (key !== renderedActions) {
      renderedActions = key;
      const final = FINAL.has(job.status);
      fill(
        actions,
        !final
          ? h("button", { type: "button", id: "cancel-job", class: "danger", onclick: cancel, disabled: cancelRequested }, cancelRequested ? "Cancelling…" : "Cancel")
          : null,
        h("button", { type: "button", id: "clone-job", class: "secondary", onclick: clone }, "Clone and edit"),
        h("a", { class: "button secondary", href: `#/compare/${job.id}`, id: "compare-job" }, "Compare"),
        final ? h("button", { type: "button", id: "delete-job", class: "danger", onclick: remove }, "Delete") : null,
      );
    }
    fill(errorBox, job.error ? h("p", { class: "error-box", id: "job-error" }, `${job.error.code ?? "error"}: ${job.error.message}`) : null);
  }

  function renderProgress() {
    if (!job) return;
    const final = FINAL.has(job.status);
    const phase = currentPhase(job, reportedPhase, metrics);
    const step = metrics?.step;
    const total = metrics?.totalSteps;
    if (job.status === "succeeded") progressBar.value = 1;
    else if (metrics?.progress !== null && metrics?.progress !== undefined) progressBar.value = metrics.progress;
    const steps = step === null || step === undefined ? null : `step ${step}${total ? ` of ${total}` : ""}`;
    if (job.status === "succeeded") progressText.textContent = steps ? `Finished at ${steps}` : "Finished";
    else if (job.status === "cancelled") progressText.textContent = steps ? `Cancelled at ${steps}` : "Cancelled before training started";
    else if (job.status === "failed") progressText.textContent = steps ? `Failed at ${steps}` : "Failed before training started";
    else if (steps) progressText.textContent = `${steps[0].toUpperCase()}${steps.slice(1)}${job.status === "running" && metrics.etaS !== null ? ` · ETA ${formatDuration(metrics.etaS)}` : ""}`;
    else progressText.textContent = "Training has not started yet";

    const text = phaseText(phase);
    phaseLabel.textContent = final ? FINAL_TEXT[job.status] : text;
    phaseLabel.dataset.phase = phase.phase;
    const phaseFraction = !final && phase.phase !== "training" && phase.total ? phase.done / phase.total : null;
    phaseProgress.hidden = phaseFraction === null;
    if (phaseFraction !== null) phaseProgress.value = phaseFraction;
    if (!final && phase.phase !== "training" && phase.etaS !== null && phase.etaS !== undefined) {
      phaseLabel.textContent += ` · ETA ${formatDuration(phase.etaS)}`;
    }
    // A final job's stepper stops where the job was when it ended.
    const lastActive = final ? currentPhase({ ...job, status: "running" }, reportedPhase, metrics) : phase;
    fill(phaseList, phaseStates(phase, job, lastActive).map((p) =>
      h("li", { class: `phase-step ${p.state}`, "aria-current": p.state === "current" ? "step" : null },
        p.label, h("span", { class: "visually-hidden" }, ` (${p.state === "todo" ? "to come" : p.state})`))));
  }

  function renderDetails() {
    const hp = job.hyperparameters ?? {};
    const multiplier = hp.learning_rate_multiplier;
    const learningRate = baseLearningRate === null || multiplier === undefined
      ? `multiplier ${multiplier ?? "–"}`
      : `${formatRate(baseLearningRate * multiplier)} (base ${formatRate(baseLearningRate)} × multiplier ${multiplier})`;
    const end = FINAL.has(job.status) ? job.finished_at : Date.now() / 1000;
    const duration = end ? formatDuration(end - job.created_at) + (FINAL.has(job.status) ? "" : " so far") : "–";
    const trainedTokens = job.trained_tokens ?? metrics?.trainedTokens;
    fill(
      details,
      [
        ["Base model", job.model, "detail-model"],
        ["Training file", fileView(job.training_file), "detail-training-file"],
        ["Validation file", job.validation_file ? fileView(job.validation_file) : "none", "detail-validation-file"],
        ["Learning rate", learningRate, "detail-learning-rate"],
        ["Trained tokens", formatCount(trainedTokens), "detail-trained-tokens"],
        ["Duration (created → finished)", duration, "detail-duration"],
        ["Finished", job.finished_at ? formatTime(job.finished_at) : "–", "detail-finished"],
        ["Validation loss", formatNumber(job.validation_loss, 4), "detail-validation-loss"],
        ["Estimated peak memory", job.estimated_memory_bytes ? formatBytes(job.estimated_memory_bytes) : "–", "detail-memory"],
        ["Seed", job.seed, "detail-seed"],
        ["Suffix", job.user_provided_suffix ?? "none", "detail-suffix"],
      ].map(([label, value, id]) => [h("dt", {}, label), h("dd", { id }, value)]),
    );
    const known = new Set(HYPERPARAMETERS.map(([key]) => key));
    const rows = [...HYPERPARAMETERS.filter(([key]) => key in hp), ...Object.keys(hp).filter((k) => !known.has(k)).map((k) => [k, k])];
    fill(hyperparameters, rows.map(([key, label]) =>
      h("tr", { dataset: { key } }, h("th", { scope: "row" }, label), h("td", {}, hyperparameterValue(key, hp[key])))));
  }

  function fileView(fileId) {
    const file = files[fileId];
    if (file === undefined) {
      files[fileId] = null; // fetch once
      api.getFile(fileId)
        .then((f) => (files[fileId] = f))
        .catch((err) => (files[fileId] = { error: err.status === 404 ? "deleted" : err.message }))
        .finally(() => job && renderDetails());
    }
    if (!file) return h("code", {}, fileId);
    if (file.error) return [h("code", {}, fileId), h("span", { class: "muted" }, ` (${file.error})`)];
    return [file.filename, " ", h("span", { class: "muted" }, `(${formatCount(file.report?.rows)} rows, `, h("code", {}, fileId), ")")];
  }

  function renderModel() {
    const name = job.fine_tuned_model;
    if (!name) {
      fill(modelBox, h("p", { class: "muted" }, job.status === "succeeded" ? "This job's model was deleted." :
        FINAL.has(job.status) ? "No model: the job did not succeed. Its checkpoints are below." : "The model is ready once the job succeeds."));
      return;
    }
    const base = `${window.location.origin}/v1`;
    const curl = [
      `curl ${base}/chat/completions \\`,
      `  -H "Authorization: Bearer $MODULORA_API_KEY" \\`,
      `  -H "Content-Type: application/json" \\`,
      `  -d '${JSON.stringify({ model: name, messages: [{ role: "user", content: "Hello!" }] })}'`,
    ].join("\n");
    const python = [
      "import os",
      "from openai import OpenAI",
      "",
      `client = OpenAI(base_url="${base}", api_key=os.environ["MODULORA_API_KEY"])`,
      "reply = client.chat.completions.create(",
      `    model="${name}",`,
      '    messages=[{"role": "user", "content": "Hello!"}],',
      ")",
      "print(reply.choices[0].message.content)",
    ].join("\n");
    fill(
      modelBox,
      h("p", { class: "model-id" }, h("code", { id: "fine-tuned-model" }, name), " ", copyButton(name, "Copy the model id", { id: "copy-model-id" })),
      h("div", { class: "job-actions" },
        h("button", { type: "button", id: "download-adapter", "aria-label": `Download adapter (.zip) of ${name}`,
          onclick: () => downloadOrSay(`/v1/dashboard/models/${encodeURIComponent(name)}/download`, `${name.replace(/[^\w.-]+/g, "_")}.zip`) },
        "Download adapter (.zip)"),
        // For other stacks: dense bf16 weights with the adapter merged, and llama.cpp's LoRA for a GGUF base.
        h("button", { type: "button", id: "export-merged", class: "secondary", "aria-label": `Download merged (bf16): ${name} merged into its base, as a .zip`,
          onclick: () => downloadOrSay(`/v1/models/${encodeURIComponent(name)}/export?format=merged`, `${name.replaceAll(":", "_")}-merged.zip`) },
        "Download merged (bf16)"),
        // OpenAI's step-metrics CSV, the job's result file.
        job.result_files?.length
          ? h("button", { type: "button", id: "download-step-metrics", class: "secondary", "aria-label": `Download the step metrics (CSV) of ${name}`,
            onclick: () => downloadOrSay(`/v1/files/${encodeURIComponent(job.result_files[0])}/content`, "step_metrics.csv") },
          "Step metrics (.csv)")
          : null,
        job.hyperparameters?.quantization === "gguf"
          ? h("button", { type: "button", id: "export-gguf-lora", class: "secondary", "aria-label": `Download llama.cpp LoRA (.gguf) of ${name}`,
            onclick: () => downloadOrSay(`/v1/models/${encodeURIComponent(name)}/export?format=gguf-lora`, `${name.replaceAll(":", "_")}.gguf`) },
          "Download llama.cpp LoRA (.gguf)")
          : null,
        h("a", { class: "button secondary", href: "#/playground", onclick: () => sessionStorage.setItem("modulora.chatModel", name) }, "Chat in the playground"),
        h("button", { type: "button", class: "danger", id: "delete-model", onclick: () => removeModel(name) }, "Delete model")),
      h("p", { class: "muted" }, "Call it from anywhere; the key is read from ", h("code", {}, "MODULORA_API_KEY"), "."),
      snippet("curl", curl, "snippet-curl"),
      snippet("Python (openai SDK)", python, "snippet-python"),
    );
  }

  function snippet(title, text, id) {
    return h("div", { class: "snippet" },
      h("div", { class: "snippet-head" }, h("h3", {}, title), copyButton(text, `Copy the ${title} snippet`)),
      h("pre", { id, tabindex: 0, "aria-label": `${title} snippet` }, h("code", {}, text)));
  }

  async function downloadOrSay(path, filename) {
    try {
      await api.download(path, filename);
    } catch (err) {
      window.alert(`Could not download ${filename}: ${err.message}`);
    }
  }

  function renderCheckpoints(checkpoints) {
    fill(
      checkpointRows,
      checkpoints.length ? null : h("tr", {}, h("td", { colspan: 5, class: "muted" }, "No checkpoints yet.")),
      checkpoints.map((c) => {
        const name = c.fine_tuned_model_checkpoint ?? c.id;
        const cell = (label, ...content) => h("td", { dataset: { label } }, ...content);
        return h("tr", { dataset: { step: c.step_number } },
          cell("Step", c.step_number),
          cell("Train loss", formatNumber(c.metrics?.train_loss, 4)),
          cell("Valid loss", formatNumber(c.metrics?.valid_loss, 4)),
          cell("Checkpoint", h("span", { class: "name-cell" },
            h("code", { class: "truncate", title: name }, name), copyButton(name, `Copy the name of the step ${c.step_number} checkpoint`))),
          cell("Actions", h("span", { class: "row-actions" },
            h("button", { type: "button", class: "link", "aria-label": `Download the step ${c.step_number} checkpoint (zip)`,
              onclick: () => downloadOrSay(`/v1/dashboard/checkpoints/${c.id}/download`, `${c.id}.zip`) }, "Download"),
            h("a", { href: "#/playground", "aria-label": `Chat with the step ${c.step_number} checkpoint`,
              onclick: () => sessionStorage.setItem("modulora.chatModel", c.id) }, "Chat"))),
        );
      }),
    );
  }

  function addMessages(newMessages) {
    for (const m of newMessages) {
      lastMessage = Math.max(lastMessage, m.n);
      notePhase(readPhase(m.data) ?? (reportedPhase?.explicit ? null : phaseFromMessage(m.message)), m.n);
      eventsList.append(h("li", { class: `event level-${m.level}` }, h("time", {}, formatTime(m.created_at)), " ", m.message));
    }
    if (newMessages.length) renderProgress();
  }

  // ---- actions -------------------------------------------------------------------------------

  // The worker stops at the next step boundary; until the state changes the button says so.
  async function cancel() {
    if (!window.confirm(`Cancel job ${jobId}? It stops after the current step and keeps its last checkpoint.`)) return;
    cancelRequested = true;
    renderHead();
    try {
      job = await api.cancelJob(jobId);
      renderHead();
      renderProgress();
    } catch (err) {
      cancelRequested = false;
      renderHead();
      fill(errorBox, h("p", { class: "error-box", role: "alert" }, `Could not cancel job ${jobId}: ${err.message}`));
    }
  }

  function clone() {
    const { model, training_file, validation_file, user_provided_suffix, hyperparameters: hp, metadata, id } = job;
    sessionStorage.setItem("modulora.cloneJob", JSON.stringify({ id, model, training_file, validation_file, suffix: user_provided_suffix, hyperparameters: hp, metadata }));
    window.location.hash = "#/new";
  }

  async function remove() {
    const extra = job.fine_tuned_model ? `, its model ${job.fine_tuned_model}` : "";
    if (!window.confirm(`Delete job ${jobId}${extra}, its checkpoints and its events? This cannot be undone.`)) return;
    try {
      await api.deleteJob(jobId);
      window.location.hash = "#/jobs";
    } catch (err) {
      fill(errorBox, h("p", { class: "error-box", role: "alert" }, `Could not delete job ${jobId}: ${err.message}`));
    }
  }

  async function removeModel(name) {
    if (!window.confirm(`Delete the model ${name} and its adapter files? The job and its checkpoints stay. This cannot be undone.`)) return;
    try {
      await api.deleteModel(name);
      job = { ...job, fine_tuned_model: null };
      renderModel();
    } catch (err) {
      fill(errorBox, h("p", { class: "error-box", role: "alert" }, `Could not delete the model ${name}: ${err.message}`));
    }
  }

  // ---- side tables ---------------------------------------------------------------------------

  async function pollSideTables() {
    const [latestJob, newMessages, checkpoints] = await Promise.allSettled([
      api.getJob(jobId), api.getJobMessages(jobId, lastMessage), api.listCheckpoints(jobId)]);
    if (latestJob.status === "fulfilled" && latestJob.value.status !== job.status) {
      job = latestJob.value; // queued -> running arrives here; the stream carries steps, not states
      renderHead();
      renderModel();
      renderDetails();
    }
    if (newMessages.status === "fulfilled") addMessages(newMessages.value);
    if (!FINAL.has(job.status)) renderDetails(); // the duration so far
    if (checkpoints.status === "fulfilled") renderCheckpoints(checkpoints.value);
    const failed = [latestJob, newMessages, checkpoints].find((r) => r.status === "rejected");
    eventsList.dataset.error = failed ? failed.reason.message : "";
    if (!failed) renderProgress();
    // The worker writes its last checkpoint and events around the final state: keep looking a little.
    if (FINAL.has(job.status)) pollsAfterEnd += 1;
    if (!abort.signal.aborted && pollsAfterEnd <= POLLS_AFTER_END) pollTimer = setTimeout(pollSideTables, POLL_MS);
  }

  // A page opened while the server is down keeps trying until it answers.
  async function start() {
    let delay = RETRY_MIN_MS;
    while (!abort.signal.aborted) {
      try {
        await refreshJob();
        break;
      } catch (err) {
        if (abort.signal.aborted) return;
        const retry = err.status === 0 || err.status >= 500;
        loadError.hidden = false;
        loadError.textContent = `Could not load job ${jobId}: ${err.message}${retry ? `. Retrying in ${delay / 1000}s…` : ""}`;
        phaseLabel.textContent = retry ? "Waiting for the server…" : "";
        if (!retry) return;
        await sleep(delay);
        delay = Math.min(2 * delay, RETRY_MAX_MS);
      }
    }
    loadError.hidden = true;
    api.getDashboardOptions()
      .then((options) => {
        baseLearningRate = options.base_learning_rate ?? null;
        if (job) renderDetails();
      })
      .catch(() => {}); // the learning rate then shows the multiplier alone
    followStream();
    pollSideTables();
  }

  start();
  return () => {
    abort.abort();
    clearTimeout(pollTimer);
    Object.values(charts).forEach((c) => c.destroy());
  };
}
