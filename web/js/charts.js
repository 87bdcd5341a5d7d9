// Line charts on uPlot: x = training step, one or more y series, points appended as the metrics
// stream delivers them (or set at once for a comparison). Redraws are batched to one per frame.
// Each chart carries its own text alternative: a summary under it and a data table on demand.

import uPlot from "../vendor/uplot/uPlot.esm.js";
import { fill, h } from "./dom.js";

// Distinct hues with at least 3:1 contrast against the white chart background.
export const COLORS = ["#1d4ed8", "#b91c1c", "#047857", "#b45309", "#7c3aed", "#0e7490", "#be185d", "#4d7c0f"];
// Steps are whole numbers: never put a tick between two of them.
const STEP_INCREMENTS = [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000, 50000, 100000];
const TABLE_MAX_ROWS = 1000;
const MIN_WIDTH = 200;

/** Exponential moving average with TensorBoard's debiasing; nulls stay null and do not reset it. */
export function ema(values, weight) {
  if (!weight) return values;
  let last = 0;
  let n = 0;
  return values.map((v) => {
    if (v === null || v === undefined) return null;
    last = last * weight + (1 - weight) * v;
    n += 1;
    return last / (1 - weight ** n);
  });
}

const defaultFormat = (v) => String(Number(v.toPrecision(4)));

/** The y axis is as wide as its longest tick label (uPlot calls this with the formatted ticks). */
function axisWidth(u, values) {
  const longest = Math.max(3, ...(values ?? []).map((v) => String(v).length));
  return 18 + 7 * longest;
}

export class LiveChart {
  /**
   * @param {string} id        DOM id of the chart's box (tests find charts by it)
   * @param {string} title
   * @param {{label: string, format?: (v: number) => string, points?: boolean, color?: string}[]} series
   * @param {{heading?: string}} options  heading: the title's element, to fit the page's outline
   */
  constructor(id, title, series, { heading = "h3" } = {}) {
    this.id = id;
    this.title = title;
    this.series = series;
    this.data = [[], ...series.map(() => [])];
    this.steps = new Map(); // step -> index, so a replayed step overwrites instead of duplicating
    this.smoothing = 0;
    this.logScale = false;
    this.plot = null;
    this.pending = false;
    this.summary = h("p", { class: "chart-summary muted", id: `${id}-summary` }, "No data yet.");
    this.tableBox = h("div", { class: "table-scroll", tabindex: 0, role: "region", "aria-label": `${title}: data` });
    this.details = h("details", { class: "chart-data" }, h("summary", {}, `Data table: ${title}`), this.tableBox);
    this.details.addEventListener("toggle", () => this.details.open && this.renderTable());
    this.plotBox = h("div", { class: "plot" });
    this.el = h(
      "figure",
      { class: "chart", id, dataset: { points: 0, series: 0 } },
      h(heading, { class: "chart-title", id: `${id}-title` }, title),
      this.plotBox,
      h("figcaption", {}, this.summary),
      this.details,
    );
  }

  /** Create the uPlot once the box is in the document (it needs a width). */
  mount() {
    this.createPlot();
    this.resizeObserver = new ResizeObserver(() => this.plot?.setSize(this.size()));
    this.resizeObserver.observe(this.el);
  }

  size() {
    const style = getComputedStyle(this.el);
    const inner = this.el.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
    return { width: Math.max(MIN_WIDTH, Math.floor(inner)), height: window.innerWidth < 640 ? 170 : 200 };
  }

  createPlot() {
    this.plot?.destroy();
    const format = this.series[0]?.format ?? defaultFormat;
    this.plot = new uPlot(
      {
        ...this.size(),
        scales: { x: { time: false }, y: this.logScale ? { distr: 3, log: 10 } : {} },
        axes: [
          { label: "step", incrs: STEP_INCREMENTS },
          // A log axis leaves some ticks unlabelled: uPlot hands those over as null.
          { size: axisWidth, values: (u, ticks) => ticks.map((v) => (v === null ? "" : format(v))) },
        ],
        series: [
          { label: "step" },
          ...this.series.map((s, i) => ({
            label: s.label,
            stroke: s.color ?? COLORS[i % COLORS.length],
            width: 2,
            spanGaps: true,
            // Marker series (validation) are sparse: dots only, so they never read as a second curve.
            ...(s.points ? { paths: () => null } : {}),
            points: { show: s.points ?? false, size: 7, fill: s.points ? "#fff" : undefined },
            value: (u, v) => (v === null || v === undefined ? "–" : (s.format ?? defaultFormat)(v)),
          })),
        ],
      },
      this.displayData(),
      this.plotBox,
    );
    const canvas = this.plot.root.querySelector(".u-wrap");
    canvas.setAttribute("role", "img");
    canvas.setAttribute("aria-labelledby", `${this.id}-title ${this.id}-summary`);
  }

  /** What is drawn: the raw columns, lines smoothed when smoothing is on (markers never are). */
  displayData() {
    const [steps, ...columns] = this.data;
    return [steps, ...columns.map((column, i) => (this.series[i].points ? column : ema(column, this.smoothing)))];
  }

  /** Add (or overwrite) the values at `step`; `values[i]` may be null where a series has no point. */
  add(step, values) {
    let index = this.steps.get(step);
    if (index === undefined) {
      index = this.data[0].length;
      // Steps arrive in order except after a replay; keep x sorted for uPlot.
      if (index > 0 && step < this.data[0][index - 1]) index = this.data[0].findIndex((x) => x > step);
      this.data.forEach((column) => column.splice(index, 0, null));
      this.data[0][index] = step;
      this.steps = new Map(this.data[0].map((x, i) => [x, i]));
    }
    values.forEach((value, i) => {
      if (value !== null && value !== undefined) this.data[i + 1][index] = value;
    });
    this.scheduleRedraw();
  }

  /** Replace every series at once (the comparison): `columns[i][k]` is series i at `steps[k]`. */
  setData(series, steps, columns) {
    const recreate = series.length !== this.series.length || series.some((s, i) => s.label !== this.series[i]?.label);
    this.series = series;
    this.data = [steps, ...columns];
    this.steps = new Map(steps.map((x, i) => [x, i]));
    if (recreate && this.plot) this.createPlot();
    this.scheduleRedraw();
  }

  setSmoothing(weight) {
    this.smoothing = weight;
    this.scheduleRedraw();
  }

  setLogScale(on) {
    if (on === this.logScale) return;
    this.logScale = on;
    if (this.plot) this.createPlot();
  }

  scheduleRedraw() {
    // Counts for tests and scripts, kept current without waiting for a frame.
    this.el.dataset.points = String(this.data[0].length);
    this.el.dataset.series = String(this.data.slice(1).filter((c) => c.some((v) => v !== null && v !== undefined)).length);
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.plot?.setData(this.displayData());
      this.summary.textContent = this.describe();
      if (this.details.open) this.renderTable();
    });
  }

  /** One sentence per series: its range of steps, first and last value, and its lowest point. */
  describe() {
    const steps = this.data[0];
    if (!steps.length) return "No data yet.";
    const parts = this.series.map((s, i) => {
      const format = s.format ?? defaultFormat;
      const points = steps.map((x, k) => [x, this.data[i + 1][k]]).filter(([, v]) => v !== null && v !== undefined);
      if (!points.length) return `${s.label}: no values yet.`;
      const [firstStep, first] = points[0];
      const [lastStep, last] = points[points.length - 1];
      const [lowStep, low] = points.reduce((a, b) => (b[1] < a[1] ? b : a));
      if (points.length === 1) return `${s.label}: ${format(first)} at step ${firstStep}.`;
      return `${s.label}: ${points.length} values, ${format(first)} at step ${firstStep} to ${format(last)} at step ${lastStep}; lowest ${format(low)} at step ${lowStep}.`;
    });
    return `${this.title}. ${parts.join(" ")}`;
  }

  renderTable() {
    const steps = this.data[0];
    const start = Math.max(0, steps.length - TABLE_MAX_ROWS);
    fill(
      this.tableBox,
      start ? h("p", { class: "muted" }, `The last ${TABLE_MAX_ROWS} of ${steps.length} steps.`) : null,
      h(
        "table",
        { class: "data-table" },
        h("caption", { class: "visually-hidden" }, `${this.title}, raw values by step`),
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "step"), this.series.map((s) => h("th", { scope: "col" }, s.label)))),
        h(
          "tbody",
          {},
          steps.slice(start).map((x, k) =>
            h(
              "tr",
              {},
              h("th", { scope: "row" }, x),
              this.series.map((s, i) => {
                const v = this.data[i + 1][start + k];
                return h("td", {}, v === null || v === undefined ? "–" : (s.format ?? defaultFormat)(v));
              }),
            ),
          ),
        ),
      ),
    );
  }

  destroy() {
    this.resizeObserver?.disconnect();
    this.plot?.destroy();
  }
}

/** The smoothing slider and log-scale switch for `charts`; `idPrefix` keeps ids unique. */
export function chartControls(charts, idPrefix) {
  const slider = h("input", { type: "range", id: `${idPrefix}-smoothing`, min: 0, max: 0.99, step: 0.01, value: 0 });
  const value = h("output", { for: slider.id, id: `${idPrefix}-smoothing-value` }, "off");
  const log = h("input", { type: "checkbox", id: `${idPrefix}-log-scale` });
  slider.addEventListener("input", () => {
    const weight = Number(slider.value);
    value.textContent = weight ? weight.toFixed(2) : "off";
    charts.forEach((c) => c.setSmoothing(weight));
  });
  log.addEventListener("change", () => charts.forEach((c) => c.setLogScale(log.checked)));
  return h(
    "div",
    { class: "chart-controls" },
    h("label", { for: slider.id }, "Smoothing (EMA) "),
    slider,
    value,
    h("label", { class: "inline" }, log, " Log scale"),
  );
}
