// Jobs list: status, progress and ETA, refreshed every two seconds while the page is open.

import * as api from "../api.js";
import { fill, formatDuration, formatTime, h, statusBadge } from "../dom.js";

const REFRESH_MS = 2000;

export function renderJobs(main) {
  const rows = h("tbody", { id: "job-rows" });
  const error = h("p", { class: "error", role: "alert" });
  let timer = null;
  let stopped = false;

  async function refresh() {
    try {
      const [jobs, progress] = await Promise.all([api.listJobs(50), api.getJobsProgress()]);
      const byId = new Map(progress.data.map((p) => [p.id, p]));
      error.textContent = "";
      fill(
        rows,
        jobs.data.length ? null : h("tr", {}, h("td", { colspan: 6, class: "muted" }, "No jobs yet. ", h("a", { href: "#/new" }, "Start one"), ".")),
        jobs.data.map((job) => jobRow(job, byId.get(job.id))),
      );
    } catch (err) {
      error.textContent = `Could not refresh: ${err.message}`;
    } finally {
      if (!stopped) timer = setTimeout(refresh, REFRESH_MS);
    }
  }

  main.append(
    h("div", { class: "page-head" }, h("h1", {}, "Fine-tuning jobs"), h("a", { class: "button", href: "#/new" }, "New job")),
    h(
      "section",
      { class: "card" },
      h("table", { class: "jobs" },
        h("thead", {}, h("tr", {}, ["Job", "Model", "Status", "Progress", "ETA", "Created"].map((t) => h("th", {}, t)))),
        rows),
      error,
    ),
  );
  refresh();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

function jobRow(job, progress) {
  const fraction = job.status === "succeeded" ? 1 : progress?.progress ?? 0;
  const eta = job.status === "running" ? formatDuration(progress?.eta_s) : "–";
  return h(
    "tr",
    { dataset: { jobId: job.id, status: job.status } },
    h("td", {}, h("a", { href: `#/jobs/${job.id}` }, h("code", {}, job.id))),
    h("td", {}, job.fine_tuned_model ?? job.model),
    h("td", {}, statusBadge(job.status)),
    h("td", {}, h("progress", { max: 1, value: fraction }), ` ${Math.round(100 * fraction)}%`,
      progress?.total_steps ? h("span", { class: "muted" }, ` step ${progress.step}/${progress.total_steps}`) : null),
    h("td", { class: "eta" }, eta),
    h("td", {}, formatTime(job.created_at)),
  );
}
