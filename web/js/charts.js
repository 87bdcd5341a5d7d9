// Live line charts on uPlot: x = training step, one or more y series, points appended as the
// metrics stream delivers them. Redraws are batched to one per animation frame.

import uPlot from "../vendor/uplot/uPlot.esm.js";
import { h } from "./dom.js";

const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706"];
// Steps are whole numbers: never put a tick between two of them.
const STEP_INCREMENTS = [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000, 50000, 100000];

export class LiveChart {
  /**
   * @param {string} id        DOM id of the chart's box (tests find charts by it)
   * @param {string} title
   * @param {{label: string, format?: (v: number) => string}[]} series
   */
  constructor(id, title, series) {
    this.series = series;
    this.data = [[], ...series.map(() => [])];
    this.steps = new Map(); // step -> index, so a replayed step overwrites instead of duplicating
    this.el = h("div", { class: "chart", id, dataset: { points: 0 } }, h("h3", {}, title));
    this.plot = null;
    this.pending = false;
  }

  /** Create the uPlot once the box is in the document (it needs a width). */
  mount() {
    const width = Math.max(280, this.el.clientWidth - 16);
    this.plot = new uPlot(
      {
        width,
        height: 200,
        scales: { x: { time: false } },
        axes: [
          { label: "step", incrs: STEP_INCREMENTS },
          { size: 72, values: (u, ticks) => ticks.map((v) => (this.series[0].format ?? String)(v)) },
        ],
        series: [
          { label: "step" },
          ...this.series.map((s, i) => ({
            label: s.label,
            stroke: COLORS[i % COLORS.length],
            width: 2,
            spanGaps: true,
            points: { show: s.points ?? false, size: 6 },
            value: (u, v) => (v === null || v === undefined ? "–" : (s.format ?? ((x) => x.toPrecision(4)))(v)),
          })),
        ],
      },
      this.data,
      this.el,
    );
    this.resizeObserver = new ResizeObserver(() => this.plot.setSize({ width: Math.max(280, this.el.clientWidth - 16), height: 200 }));
    this.resizeObserver.observe(this.el);
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
    this.el.dataset.points = String(this.data[0].length);
    this.scheduleRedraw();
  }

  scheduleRedraw() {
    if (this.pending || !this.plot) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.plot.setData(this.data);
    });
  }

  destroy() {
    this.resizeObserver?.disconnect();
    this.plot?.destroy();
  }
}
