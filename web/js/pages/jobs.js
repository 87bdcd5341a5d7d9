// Jobs list: base and fine-tuned model, suffix, status, progress (or the phase before and after
// training) and ETA, refreshed every two seconds; filters by status, base model and text; pick two
// or more runs to compare.

import * as api from "../api.js";
import { fill, formatDuration, formatTime, h, statusBadge } from "../dom.js";
import { phaseText, readPhase } from "../phases.js";

const REFRESH_MS = 2000;
const FINAL = new Set(["succeeded", "failed", "cancelled"]);
const STATUS_FILTERS = [
  ["", "any status"],
  ["active", "waiting or running"],
  ["running", "running"],
  ["queued", "queued"],
  ["succeeded", "succeeded"],
  ["failed", "failed"],
  ["cancelled", "cancelled"],
];
const COLUMNS = ["", "Job", "Base model", "Fine-tuned model", "Suffix", "Status", "Progress", "ETA", "Created"];

export function renderJobs(main) {
  const rows = h("tbody", { id: "job-rows" });
  const error = h("p", { class: "error", role: "alert", id: "jobs-error" });
  const note = h("p", { class: "muted", id: "jobs-note" });
  const count = h("p", { class: "muted", id: "jobs-count", "aria-live": "polite" });
  const selected = new Set();
  let jobs = null;
  let progress = new Map();
  let timer = null;
  let stopped = false;

  const statusFilter = h("select", { id: "filter-status" }, STATUS_FILTERS.map(([value, text]) => h("option", { value }, text)));
  const modelFilter = h("select", { id: "filter-model" }, h("option", { value: "" }, "any base model"));
  const textFilter = h("input", { id: "filter-text", type: "search", placeholder: "id, suffix or model name" });
  const compareButton = h("button", { type: "button", id: "compare-selected", disabled: true, onclick: compare }, "Compare selected");
  for (const control of [statusFilter, modelFilter, textFilter]) control.addEventListener("input", render);

  function compare() {
    window.location.hash = `#/compare/${[...selected].join(",")}`;
  }

  function matches(job) {
    const status = statusFilter.value;
    if (status === "active" ? FINAL.has(job.status) : status && job.status !== status) return false;
    if (modelFilter.value && job.model !== modelFilter.value) return false;
    const text = textFilter.value.trim().toLowerCase();
    if (!text) return true;
    return [job.id, job.model, job.fine_tuned_model, job.user_provided_suffix].some((v) => v?.toLowerCase().includes(text));
  }

  function render() {
    if (!jobs) return;
    const models = [...new Set(jobs.map((j) => j.model))].sort();
    if (models.join("\n") !== [...modelFilter.options].slice(1).map((o) => o.value).join("\n")) {
      const chosen = modelFilter.value;
      fill(modelFilter, h("option", { value: "" }, "any base model"), models.map((m) => h("option", { value: m }, m)));
      modelFilter.value = models.includes(chosen) ? chosen : "";
    }
    const shown = jobs.filter(matches);
    count.textContent = shown.length === jobs.length ? `${jobs.length} jobs` : `${shown.length} of ${jobs.length} jobs match the filters`;
    fill(
      rows,
      jobs.length
        ? null
        : h("tr", {}, h("td", { colspan: COLUMNS.length, class: "muted" }, "No jobs yet. ", h("a", { href: "#/new" }, "Start one"), ".")),
      shown.map((job) => jobRow(job, progress.get(job.id), selected, onSelect)),
    );
  }

  function onSelect(jobId, on) {
    if (on) selected.add(jobId);
    else selected.delete(jobId);
    compareButton.disabled = selected.size < 2;
    compareButton.textContent = selected.size >= 2 ? `Compare ${selected.size} runs` : "Compare selected";
  }

  // The list and the progress side table are fetched independently: one failing does not empty the other.
  async function refresh() {
    const [list, latest] = await Promise.allSettled([api.listJobs(100), api.getJobsProgress()]);
    if (list.status === "fulfilled") {
      jobs = list.value.data;
      error.textContent = "";
    } else {
      error.textContent = `Could not refresh the jobs list: ${list.reason.message}${jobs ? " (showing the last list)" : ""}`;
    }
    if (latest.status === "fulfilled") {
      progress = new Map(latest.value.data.map((p) => [p.id, p]));
      note.textContent = "";
    } else {
      note.textContent = `Progress is not up to date: ${latest.reason.message}`;
    }
    // Re-rendering while a checkbox or link of the list has focus would lose it: skip this round.
    const focused = document.activeElement;
    if (!(focused && rows.contains(focused))) render();
    if (!stopped) timer = setTimeout(refresh, REFRESH_MS);
  }

  main.append(
    h("div", { class: "page-head" }, h("h1", {}, "Fine-tuning jobs"), h("a", { class: "button", href: "#/new" }, "New job")),
    h(
      "section",
      { class: "card", "aria-labelledby": "jobs-heading" },
      h("h2", { id: "jobs-heading", class: "visually-hidden" }, "Your jobs"),
      h(
        "div",
        { class: "filters", role: "group", "aria-label": "Filter jobs" },
        h("label", {}, "Status ", statusFilter),
        h("label", {}, "Base model ", modelFilter),
        h("label", {}, "Search ", textFilter),
        compareButton,
      ),
      count,
      h(
        "div",
        { class: "table-wrap" },
        h(
          "table",
          { class: "jobs responsive" },
          h("thead", {}, h("tr", {}, COLUMNS.map((t) => h("th", { scope: "col" }, t || h("span", { class: "visually-hidden" }, "Select"))))),
          rows,
        ),
      ),
      error,
      note,
    ),
  );
  refresh();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

function jobRow(job, progress, selected, onSelect) {
  const fraction = job.status === "succeeded" ? 1 : progress?.progress ?? 0;
  const phase = job.phase?.phase !== "training" ? readPhase(job.phase) : null;
  const eta = job.status === "running" && progress?.eta_s !== null && progress?.eta_s !== undefined ? formatDuration(progress.eta_s) : "–";
  const checkbox = h("input", {
    type: "checkbox",
    class: "select-job",
    "aria-label": `Select ${job.id} to compare`,
    checked: selected.has(job.id),
    onchange: (e) => onSelect(job.id, e.target.checked),
  });
  const cell = (label, ...content) => h("td", { dataset: { label } }, ...content);
  return h(
    "tr",
    { dataset: { jobId: job.id, status: job.status } },
    cell("Compare", checkbox),
    cell("Job", h("a", { href: `#/jobs/${job.id}` }, h("code", {}, job.id))),
    cell("Base model", job.model),
    cell("Fine-tuned model", job.fine_tuned_model ? h("code", { class: "model-name", title: job.fine_tuned_model }, job.fine_tuned_model) : h("span", { class: "muted" }, "–")),
    cell("Suffix", job.user_provided_suffix ?? h("span", { class: "muted" }, "–")),
    cell("Status", statusBadge(job.status)),
    cell(
      "Progress",
      h("progress", { max: 1, value: fraction, "aria-label": `Progress of ${job.id}` }),
      ` ${Math.round(100 * fraction)}%`,
      // Before and after training the job's own phase says more than the step count.
      phase ? h("span", { class: "muted phase-note" }, ` ${phaseText(phase)}`)
        : progress?.total_steps ? h("span", { class: "muted" }, ` step ${progress.step}/${progress.total_steps}`) : null,
    ),
    h("td", { class: "eta", dataset: { label: "ETA" } }, eta),
    cell("Created", formatTime(job.created_at)),
  );
}
