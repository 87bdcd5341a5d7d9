// Datasets: drag-and-drop upload with a progress bar, the validation report, a rendered preview.

import * as api from "../api.js";
import { fill, formatBytes, formatTime, h } from "../dom.js";

const DEFAULT_MAX_SEQ_LEN = 2048;

export function renderDatasets(main) {
  const fileInput = h("input", { type: "file", id: "file-input", accept: ".jsonl,.json,.csv", hidden: true });
  const progress = h("progress", { id: "upload-progress", max: 1, value: 0, hidden: true });
  const uploadStatus = h("p", { id: "upload-status", class: "muted" });
  const uploadError = h("div", { id: "upload-error", class: "error-box", role: "alert", hidden: true });
  const dropZone = h(
    "div",
    { id: "drop-zone", class: "drop-zone", tabindex: 0 },
    h("strong", {}, "Drop a JSONL, JSON or CSV file here"),
    h("span", { class: "muted" }, " or click to choose one"),
  );
  const fileTable = h("tbody", { id: "file-rows" });
  const reportPanel = h("section", { id: "report", class: "card", hidden: true });

  dropZone.addEventListener("click", () => fileInput.click());
  dropZone.addEventListener("keydown", (e) => (e.key === "Enter" || e.key === " ") && fileInput.click());
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
      await refreshFiles();
      await showReport(uploaded);
    } catch (err) {
      uploadStatus.textContent = `${file.name} was rejected; nothing was stored.`;
      showUploadError(uploadError, err);
    } finally {
      fileInput.value = "";
      setTimeout(() => (progress.hidden = true), 800);
    }
  }

  async function refreshFiles() {
    const files = await api.listFiles();
    fill(
      fileTable,
      files.length ? null : h("tr", {}, h("td", { colspan: 5, class: "muted" }, "No datasets yet.")),
      files.map((file) =>
        h(
          "tr",
          { dataset: { fileId: file.id } },
          h("td", {}, h("a", { href: "#/datasets", onclick: (e) => (e.preventDefault(), showReport(file)) }, file.filename)),
          h("td", {}, h("code", {}, file.id)),
          h("td", {}, formatBytes(file.bytes)),
          h("td", {}, formatTime(file.created_at)),
          h("td", {}, h("a", { href: `#/new`, onclick: () => sessionStorage.setItem("modulora.trainingFile", file.id) }, "Train on it")),
        ),
      ),
    );
  }

  // The report is recomputed for the chosen length limit, so truncation can be checked up front.
  async function showReport(file, maxSeqLen = DEFAULT_MAX_SEQ_LEN) {
    reportPanel.hidden = false;
    const limit = h("input", { id: "report-max-seq-len", type: "number", min: 32, max: 32768, step: 32, value: maxSeqLen });
    limit.addEventListener("change", () => showReport(file, Number(limit.value) || DEFAULT_MAX_SEQ_LEN));
    const head = h("div", { class: "page-head" }, h("h2", {}, `Report: ${file.filename}`), h("label", {}, "Length limit (tokens) ", limit));
    fill(reportPanel, head, h("p", { class: "muted" }, "Validating…"));
    try {
      const report = await api.getFileReport(file.id, { maxSeqLen });
      fill(reportPanel, head, reportView(report));
      const preview = h("div", { id: "preview" }, h("p", { class: "muted" }, "Rendering a preview…"));
      reportPanel.append(h("h3", {}, "Preview (as the model sees it; trained tokens highlighted)"), preview);
      const rendered = await api.getFilePreview(file.id, { rows: 3, maxSeqLen });
      fill(preview, previewView(rendered));
    } catch (err) {
      reportPanel.append(h("p", { class: "error" }, `Could not load the report: ${err.message}`));
    }
  }

  main.append(
    h("h1", {}, "Datasets"),
    h("section", { class: "card" }, dropZone, fileInput, progress, uploadStatus, uploadError),
    h(
      "section",
      { class: "card" },
      h("h2", {}, "Uploaded"),
      h("table", {}, h("thead", {}, h("tr", {}, ["File", "ID", "Size", "Uploaded", ""].map((t) => h("th", {}, t)))), fileTable),
    ),
    reportPanel,
  );
  refreshFiles().catch((err) => fill(fileTable, h("tr", {}, h("td", { class: "error" }, err.message))));
}

function showUploadError(box, err) {
  const errors = err.body?.error?.errors ?? [];
  fill(
    box,
    h("strong", {}, err.line ? `Line ${err.line}: ` : "Error: "),
    err.message,
    err.param ? h("span", { class: "muted" }, ` (field: ${err.param})`) : null,
    errors.length
      ? h("ul", {}, errors.map((e) => h("li", {}, `line ${e.line}`, e.field ? ` · ${e.field}` : "", `: ${e.message}`)))
      : null,
  );
  box.hidden = false;
}

function reportView(report) {
  const stats = report.tokens ?? {};
  return h(
    "div",
    { class: "report" },
    h(
      "dl",
      { class: "facts" },
      fact("Format", report.format, "report-format"),
      fact("Rows", report.rows, "report-rows"),
      fact("Tokens (min / p50 / p95 / max)", [stats.min, stats.p50, stats.p95, stats.max].map((v) => v ?? "–").join(" / ")),
      fact(`Truncated at ${report.max_seq_len} tokens`, report.truncated, "report-truncated"),
      fact("Tokenizer", report.tokenizer ?? "–"),
    ),
    h("h3", {}, "Token lengths"),
    histogramView(report.histogram ?? []),
    h("h3", {}, "Errors"),
    report.errors?.length
      ? h(
          "ul",
          { id: "report-errors", class: "errors" },
          report.errors.map((e) => h("li", {}, h("strong", {}, `line ${e.line}`), e.field ? ` · ${e.field}` : "", `: ${e.message}`)),
        )
      : h("p", { id: "report-errors", class: "ok" }, "No errors."),
  );
}

function fact(label, value, id) {
  return [h("dt", {}, label), h("dd", { id }, value ?? "–")];
}

/** Bars as plain elements: a histogram of a few buckets needs no chart library. */
function histogramView(buckets) {
  const top = Math.max(1, ...buckets.map((b) => b.count));
  return h(
    "div",
    { class: "histogram", id: "histogram" },
    buckets.map((b) =>
      h(
        "div",
        { class: "bucket", title: `${b.lo}–${b.hi} tokens: ${b.count} rows` },
        h("div", { class: "bar", style: `height: ${(100 * b.count) / top}%` }),
        h("span", { class: "count" }, b.count),
        h("span", { class: "label" }, `${b.lo}`),
      ),
    ),
  );
}

function previewView(preview) {
  if (!preview.rows?.length) return h("p", { class: "muted" }, "No valid rows to preview.");
  return [
    h("p", { class: "muted" }, `Rendered with the chat template of ${preview.model}. `,
      h("mark", { class: "trained" }, "highlighted"), " tokens carry the loss; ", h("span", { class: "truncated" }, "struck-out"), " ones are cut by the length limit."),
    preview.rows.map((row) =>
      h(
        "div",
        { class: "sample" },
        h("div", { class: "sample-head muted" }, `line ${row.line} · ${row.trained_tokens} of ${row.tokens} tokens trained`),
        h("pre", {}, row.segments.map((s) => (s.trained ? h("mark", { class: "trained" }, s.text) : h("span", { class: s.role }, s.text)))),
      ),
    ),
  ];
}
