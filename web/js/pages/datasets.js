// Datasets: drag-and-drop upload with a progress bar, the validation report, a rendered preview,
// delete. On a fresh server the report waits while the base model's tokenizer is prepared.

import * as api from "../api.js";
import { errorList, fill, formatBytes, formatCount, formatTime, h } from "../dom.js";

const DEFAULT_MAX_SEQ_LEN = 2048;

export function renderDatasets(main) {
  const abort = new AbortController();
  const fileInput = h("input", { type: "file", id: "file-input", accept: ".jsonl,.json,.csv", hidden: true });
  const progress = h("progress", { id: "upload-progress", max: 1, value: 0, hidden: true, "aria-label": "Upload progress" });
  const uploadStatus = h("p", { id: "upload-status", class: "muted", role: "status" });
  const uploadError = h("div", { id: "upload-error", class: "error-box", role: "alert", hidden: true });
  const dropZone = h(
    "div",
    { id: "drop-zone", class: "drop-zone", tabindex: 0, role: "button" },
    h("strong", {}, "Drop a JSONL, JSON or CSV file here"),
    h("span", { class: "muted" }, " or click to choose one"),
  );
  const fileTable = h("tbody", { id: "file-rows" });
  const listError = h("p", { class: "error", role: "alert" });
  const reportPanel = h("section", { id: "report", class: "card", hidden: true, "aria-labelledby": "report-heading" });
  let reportSeq = 0;

  dropZone.addEventListener("click", () => fileInput.click());
  dropZone.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      fileInput.click();
    }
  });
  dropZone.addEventListener("dragover", (e) => {
    e.preventDefault();
    dropZone.classList.add("over");
  });
  dropZone.addEventListener("dragleave", () => dropZone.classList.remove("over"));
  dropZone.addEventListener("drop", (e) => {
    e.preventDefault();
    dropZone.classList.remove("over");
    if (e.dataTransfer.files.length) upload(e.dataTransfer.files[0]);
  });
  fileInput.addEventListener("change", () => fileInput.files.length && upload(fileInput.files[0]));

  async function upload(file) {
    uploadError.hidden = true;
    progress.hidden = false;
    progress.value = 0;
    uploadStatus.textContent = `Uploading ${file.name} (${formatBytes(file.size)})…`;
    try {
      const uploaded = await api.uploadFile(file, { onProgress: (fraction) => (progress.value = fraction) });
      progress.value = 1;
      uploadStatus.textContent = `Uploaded ${uploaded.filename} as ${uploaded.id}.`;
      refreshFiles();
      await showReport(uploaded);
    } catch (err) {
      uploadStatus.textContent = uploadFailure(file.name, err);
      showUploadError(uploadError, err);
    } finally {
      fileInput.value = "";
      setTimeout(() => (progress.hidden = true), 800);
    }
  }

  async function refreshFiles() {
    try {
      const files = await api.listFiles();
      listError.textContent = "";
      fill(
        fileTable,
        files.length ? null : h("tr", {}, h("td", { colspan: 6, class: "muted" }, "No datasets yet.")),
        files.map((file) => fileRow(file)),
      );
    } catch (err) {
      listError.textContent = `Could not list your datasets: ${err.message}`;
    }
  }

  function fileRow(file) {
    const cell = (label, ...content) => h("td", { dataset: { label } }, ...content);
    return h(
      "tr",
      { dataset: { fileId: file.id } },
      cell("File", h("button", { type: "button", class: "link", onclick: () => showReport(file), "aria-label": `Show the report of ${file.filename}` }, file.filename)),
      cell("ID", h("code", {}, file.id)),
      cell("Rows", formatCount(file.report?.rows)),
      cell("Size", formatBytes(file.bytes)),
      cell("Uploaded", formatTime(file.created_at)),
      cell("Actions", h("span", { class: "row-actions" },
        h("a", { href: "#/new", onclick: () => sessionStorage.setItem("modulora.trainingFile", file.id), "aria-label": `Train on it: ${file.filename}` }, "Train on it"),
        h("button", { type: "button", class: "link danger-link", onclick: () => remove(file), "aria-label": `Delete ${file.filename}` }, "Delete"))),
    );
  }

  async function remove(file) {
    if (!window.confirm(`Delete the dataset ${file.filename} (${file.id})? Jobs that trained on it keep their results.`)) return;
    try {
      await api.deleteFile(file.id);
      if (reportPanel.dataset.fileId === file.id) reportPanel.hidden = true;
      await refreshFiles();
    } catch (err) {
      listError.textContent = `Could not delete ${file.filename}: ${err.message}`;
    }
  }

  // The report is recomputed for the chosen length limit, so truncation can be checked up front.
  async function showReport(file, maxSeqLen = DEFAULT_MAX_SEQ_LEN) {
    const seq = ++reportSeq;
    reportPanel.hidden = false;
    reportPanel.dataset.fileId = file.id;
    const limit = h("input", { id: "report-max-seq-len", type: "number", min: 32, max: 32768, step: 32, value: maxSeqLen });
    limit.addEventListener("change", () => showReport(file, Number(limit.value) || DEFAULT_MAX_SEQ_LEN));
    const head = h("div", { class: "page-head" }, h("h2", { id: "report-heading" }, `Report: ${file.filename}`),
      h("label", {}, "Length limit (tokens) ", limit));
    const status = h("p", { class: "muted", role: "status", id: "report-status" }, "Validating…");
    fill(reportPanel, head, status);
    const waiting = (err) => seq === reportSeq && (status.textContent = err.message);
    try {
      const report = await api.whilePreparing(() => api.getFileReport(file.id, { maxSeqLen }), { onWait: waiting, signal: abort.signal });
      if (seq !== reportSeq) return;
      fill(reportPanel, head, reportView(report));
      const preview = h("div", { id: "preview" }, h("p", { class: "muted" }, "Rendering a preview…"));
      reportPanel.append(h("h3", {}, "Preview (as the model sees it; trained tokens highlighted)"), preview);
      try {
        const rendered = await api.whilePreparing(() => api.getFilePreview(file.id, { rows: 3, maxSeqLen }), { signal: abort.signal });
        if (seq === reportSeq) fill(preview, previewView(rendered));
      } catch (err) {
        if (seq === reportSeq) fill(preview, h("p", { class: "error" }, `Could not render the preview of ${file.filename}: ${err.message}`));
      }
    } catch (err) {
      if (seq === reportSeq && !abort.signal.aborted) {
        status.className = "error";
        status.textContent = `Could not load the report of ${file.filename}: ${err.message}`;
      }
    }
  }

  main.append(
    h("h1", {}, "Datasets"),
    h("section", { class: "card", "aria-labelledby": "upload-heading" },
      h("h2", { id: "upload-heading" }, "Upload"), dropZone, fileInput, progress, uploadStatus, uploadError),
    h(
      "section",
      { class: "card", "aria-labelledby": "files-heading" },
      h("h2", { id: "files-heading" }, "Uploaded"),
      h("div", { class: "table-wrap" },
        h("table", { class: "responsive files" },
          h("thead", {}, h("tr", {}, ["File", "ID", "Rows", "Size", "Uploaded", "Actions"].map((t) => h("th", { scope: "col" }, t)))),
          fileTable)),
      listError,
    ),
    reportPanel,
  );
  refreshFiles();
  return () => abort.abort();
}

/** One line on what happened to an upload that did not succeed. */
function uploadFailure(name, err) {
  if (err.network) return `The upload of ${name} did not complete: the server could not be reached. Try again.`;
  if (err.status >= 500) return `The server failed while receiving ${name} (HTTP ${err.status}). Try again.`;
  return `${name} was rejected; nothing was stored.`;
}

function showUploadError(box, err) {
  const errors = err.body?.error?.errors ?? [];
  fill(
    box,
    h("strong", {}, err.line ? `Line ${err.line}: ` : "Error: "),
    err.message,
    err.param ? h("span", { class: "muted" }, ` (field: ${err.param})`) : null,
    errors.length > 1 ? [h("p", {}, "Distinct problems:"), errorList(errors)] : null,
  );
  box.hidden = false;
}

function reportView(report) {
  const stats = report.tokens;
  const tokens = stats ? [stats.min, stats.p50, stats.p95, stats.max].map((v) => formatCount(v)).join(" / ") : "– (no tokenizer for this model)";
  return h(
    "div",
    { class: "report" },
    h(
      "dl",
      { class: "facts" },
      fact("Format", report.format, "report-format"),
      fact("Rows", report.rows, "report-rows"),
      fact("Tokens (min / median / p95 / max)", tokens, "report-tokens"),
      fact(`Longer than ${formatCount(report.max_seq_len)} tokens`, report.truncated, "report-truncated"),
      fact("Tokenizer", report.tokenizer ?? "–", "report-tokenizer"),
    ),
    h("h3", {}, "Token lengths"),
    histogramView(report.histogram ?? []),
    h("h3", {}, "Errors"),
    report.errors?.length
      ? errorList(report.errors, { id: "report-errors", total: report.error_count })
      : h("p", { id: "report-errors", class: "ok" }, "No errors."),
  );
}

function fact(label, value, id) {
  return [h("dt", {}, label), h("dd", { id }, value ?? "–")];
}

/** Bars as plain elements (a histogram of a few buckets needs no chart library), with a summary
 *  sentence and the counts as a list for screen readers. */
function histogramView(buckets) {
  if (!buckets.length) return h("p", { class: "muted", id: "histogram" }, "No token counts (no tokenizer).");
  const top = Math.max(1, ...buckets.map((b) => b.count));
  const busiest = buckets.reduce((a, b) => (b.count > a.count ? b : a));
  const total = buckets.reduce((sum, b) => sum + b.count, 0);
  const summary = `${formatCount(total)} rows in ${buckets.length} buckets from ${buckets[0].lo} to ${buckets[buckets.length - 1].hi} tokens; ` +
    `the most (${busiest.count}) have ${busiest.lo}–${busiest.hi} tokens.`;
  return h(
    "figure",
    { class: "histogram-figure" },
    h(
      "div",
      { class: "histogram", id: "histogram", "aria-hidden": "true" },
      buckets.map((b) =>
        h(
          "div",
          { class: "bucket", title: `${b.lo}–${b.hi} tokens: ${b.count} rows` },
          h("div", { class: "bar", style: `height: ${(100 * b.count) / top}%` }),
          h("span", { class: "count" }, b.count),
          h("span", { class: "label" }, `${b.lo}`),
        ),
      ),
    ),
    h("figcaption", { class: "muted" }, summary),
    h("ul", { class: "visually-hidden" }, buckets.map((b) => h("li", {}, `${b.lo} to ${b.hi} tokens: ${b.count} rows`))),
  );
}

function previewView(preview) {
  if (!preview.rows?.length) return h("p", { class: "muted" }, "No valid rows to preview.");
  return [
    h("p", { class: "muted" }, `Rendered with the chat template of ${preview.model}. `,
      h("mark", { class: "trained" }, "Highlighted"), " tokens carry the loss; ", h("span", { class: "truncated" }, "struck-out"), " ones are cut by the length limit."),
    preview.rows.map((row) =>
      h(
        "div",
        { class: "sample" },
        h("div", { class: "sample-head muted" }, `line ${row.line} · ${row.trained_tokens} of ${row.tokens} tokens trained`),
        h("pre", { tabindex: 0 }, row.segments.map((s) => (s.trained ? h("mark", { class: "trained" }, s.text) : h("span", { class: s.role }, s.text)))),
      ),
    ),
  ];
}
