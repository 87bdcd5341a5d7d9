// Compare runs: two or more jobs' loss curves overlaid on one chart (training lines, validation
// points), with smoothing and log scale, and a table of what differs between them. The chosen
// jobs live in the route (#/compare/<id>,<id>), so a comparison can be bookmarked or shared.

import * as api from "../api.js";
import { chartControls, COLORS, LiveChart } from "../charts.js";
import { fill, formatNumber, h, statusBadge } from "../dom.js";

const FINAL = new Set(["succeeded", "failed", "cancelled"]);
const REFRESH_MS = 5000;
const fmtLoss = (v) => String(Number(v.toPrecision(4)));

export function renderCompare(main, idList = "") {
  const chosen = idList.split(",").filter(Boolean);
  const abort = new AbortController();
  const chart = new LiveChart("chart-compare", "Loss by step", [], { heading: "h2" });
  const picker = h("fieldset", { class: "job-picker", id: "compare-picker" }, h("legend", {}, "Runs"), h("p", { class: "muted" }, "Loading your jobs…"));
  const differences = h("div", { id: "compare-differences" });
  const status = h("p", { class: "muted", id: "compare-status", role: "status" });
  let jobs = [];
  let timer = null;

  const label = (job) => (job.user_provided_suffix ? `${job.user_provided_suffix} (…${job.id.slice(-6)})` : `job …${job.id.slice(-6)}`);

  function choose(ids) {
    window.location.hash = `#/compare/${ids.join(",")}`;
  }

  function renderPicker() {
    fill(
      picker,
      h("legend", {}, "Runs to compare"),
      jobs.length ? null : h("p", { class: "muted" }, "No jobs yet."),
      h("ul", { class: "picker-list" }, jobs.map((job) => h("li", {},
        h("label", {},
          h("input", { type: "checkbox", value: job.id, checked: chosen.includes(job.id),
            onchange: (e) => choose(e.target.checked ? [...chosen, job.id] : chosen.filter((id) => id !== job.id)) }),
          ` ${label(job)} `, statusBadge(job.status), h("span", { class: "muted" }, ` ${job.model}`))))),
    );
  }

  async function refresh() {
    const selected = chosen.map((id) => jobs.find((j) => j.id === id)).filter(Boolean);
    if (selected.length < 2) {
      status.textContent = chosen.length ? "Pick at least one more run." : "Pick two or more runs.";
      chart.setData([], [], []);
      fill(differences);
      return;
    }
    const results = await Promise.allSettled(selected.map((job) => api.getJobLoss(job.id)));
    if (abort.signal.aborted) return;
    const failed = results.map((r, i) => [r, selected[i]]).filter(([r]) => r.status === "rejected");
    status.textContent = failed.length
      ? `Could not load the loss of ${failed.map(([r, job]) => `${job.id} (${r.reason.message})`).join(", ")}`
      : `${selected.length} runs.`;
    const curves = results.map((r) => (r.status === "fulfilled" ? r.value : { step: [], train_loss: [], valid_loss: [] }));
    // One x axis for all: the union of their steps, each run null where it has no point.
    const steps = [...new Set(curves.flatMap((c) => c.step))].sort((a, b) => a - b);
    const at = (curve, values) => {
      const byStep = new Map(curve.step.map((s, i) => [s, values[i]]));
      return steps.map((s) => byStep.get(s) ?? null);
    };
    const series = [];
    const columns = [];
    selected.forEach((job, i) => {
      const color = COLORS[i % COLORS.length];
      series.push({ label: `${label(job)} train`, color, format: fmtLoss });
      columns.push(at(curves[i], curves[i].train_loss));
      if (curves[i].valid_loss.some((v) => v !== null)) {
        series.push({ label: `${label(job)} validation`, color, points: true, format: fmtLoss });
        columns.push(at(curves[i], curves[i].valid_loss));
      }
    });
    chart.setData(series, steps, columns);
    renderDifferences(selected, curves);
    if (selected.some((job) => !FINAL.has(job.status))) timer = setTimeout(reload, REFRESH_MS);
  }

  function renderDifferences(selected, curves) {
    const keys = [...new Set(selected.flatMap((j) => Object.keys(j.hyperparameters ?? {})))].sort();
    const show = (v) => (Array.isArray(v) ? v.join(", ") : v === null || v === undefined ? "–" : String(v));
    const differing = keys.filter((k) => new Set(selected.map((j) => show(j.hyperparameters?.[k]))).size > 1);
    const lastOf = (values) => [...values].reverse().find((v) => v !== null && v !== undefined);
    const rows = [
      ["Base model", selected.map((j) => j.model)],
      ["Status", selected.map((j) => statusBadge(j.status))],
      ["Steps", curves.map((c) => c.step.length ? c.step[c.step.length - 1] : "–")],
      ["Last train loss", curves.map((c) => formatNumber(lastOf(c.train_loss), 4))],
      ["Best validation loss", curves.map((c) => {
        const values = c.valid_loss.filter((v) => v !== null);
        return values.length ? formatNumber(Math.min(...values), 4) : "–";
      })],
      ...differing.map((k) => [k, selected.map((j) => show(j.hyperparameters?.[k]))]),
    ];
    fill(
      differences,
      h("h2", {}, "Runs side by side"),
      h("p", { class: "muted" }, differing.length ? "Settings that differ between the runs, then their results." : "The runs share every setting."),
      h("div", { class: "table-wrap", tabindex: 0, role: "region", "aria-label": "Runs side by side" },
        h("table", { class: "compact", id: "compare-table" },
          h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Run"),
            selected.map((j, i) => h("th", { scope: "col" }, h("span", { class: "swatch", style: `background:${COLORS[i % COLORS.length]}`, "aria-hidden": "true" }),
              h("a", { href: `#/jobs/${j.id}` }, label(j)))))),
          h("tbody", {}, rows.map(([name, cells]) => h("tr", {}, h("th", { scope: "row" }, name), cells.map((c) => h("td", {}, c))))))),
    );
  }

  async function reload() {
    try {
      jobs = (await api.listJobs(100)).data;
      renderPicker();
    } catch (err) {
      status.textContent = `Could not list your jobs: ${err.message}`;
    }
    await refresh();
  }

  main.append(
    h("h1", {}, "Compare runs"),
    h("div", { class: "compare-layout" },
      picker,
      h("section", { class: "card compare-chart", "aria-label": "Loss curves" },
        chartControls([chart], "compare"), status, chart.el)),
    h("section", { class: "card" }, differences),
  );
  chart.mount();
  reload();
  return () => {
    abort.abort();
    clearTimeout(timer);
    chart.destroy();
  };
}
