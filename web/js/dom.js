// Tiny DOM helpers: build elements in code, format numbers and times for people.

/** h("div", {class: "x", onclick: fn}, child, "text", [more]) -> HTMLElement */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props ?? {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key in el && typeof value !== "string") el[key] = value;
    else el.setAttribute(key, value === true ? "" : value);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
}

/** Replace everything inside `el` with `children`. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export function formatBytes(bytes) {
  if (bytes === undefined || bytes === null || Number.isNaN(bytes)) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (Math.abs(value) >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
}

export function formatDuration(seconds) {
  if (seconds === undefined || seconds === null || !Number.isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

export function formatTime(unixSeconds) {
  if (!unixSeconds) return "–";
  return new Date(unixSeconds * 1000).toLocaleString();
}

export function formatNumber(value, digits = 3) {
  if (value === undefined || value === null || !Number.isFinite(value)) return "–";
  return Number(value).toPrecision(digits);
}

export function formatCount(value) {
  if (value === undefined || value === null || !Number.isFinite(value)) return "–";
  return Number(value).toLocaleString("en-US");
}

/** Learning rates as people write them: 2e-4, 1.5e-5. */
export function formatRate(value) {
  if (value === undefined || value === null || !Number.isFinite(value)) return "–";
  const [mantissa, exponent] = Number(value).toExponential(2).split("e");
  return `${Number(mantissa)}e${Number(exponent)}`;
}

/** A status pill whose class names the job state, so CSS colours it. */
export function statusBadge(status) {
  return h("span", { class: `status status-${status}`, dataset: { status } }, status.replace("_", " "));
}

/** The fine-tuned model's short name for lists: its suffix, else the end of its job id. */
export function shortModelName({ suffix, jobId }) {
  return suffix || `…${jobId.slice(-6)}`;
}

/**
 * A button that copies `text` and says so. `label` is its accessible name ("Copy model id"),
 * so several copy buttons on one page stay distinguishable.
 */
export function copyButton(text, label, { id } = {}) {
  const button = h("button", { type: "button", class: "secondary small copy", "aria-label": label, title: label, id }, "Copy");
  button.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(text);
      button.textContent = "Copied";
    } catch {
      // No clipboard (plain http on another host): select the text for the person to copy.
      button.textContent = "Press Ctrl+C";
      const range = document.createRange();
      const target = button.previousElementSibling ?? button;
      range.selectNodeContents(target);
      window.getSelection()?.removeAllRanges();
      window.getSelection()?.addRange(range);
    }
    setTimeout(() => (button.textContent = "Copy"), 1500);
  });
  return button;
}

/**
 * Group identical error messages: [{line, field, message}] -> [{field, message, lines: [..]}] in
 * first-seen order, so a file with one mistake on every row lists it once with its count.
 */
export function groupErrors(errors) {
  const groups = new Map();
  for (const e of errors ?? []) {
    const key = `${e.field ?? ""}\u0000${e.message}`;
    if (!groups.has(key)) groups.set(key, { field: e.field, message: e.message, lines: [] });
    if (e.line !== null && e.line !== undefined) groups.get(key).lines.push(e.line);
  }
  return [...groups.values()];
}

/** One list item per distinct error: "message (field) · lines 1, 2, 3 (3 rows)". */
export function errorList(errors, { id, total } = {}) {
  const groups = groupErrors(errors);
  const shown = (errors ?? []).length;
  return h(
    "div",
    {},
    h(
      "ul",
      { id, class: "errors" },
      groups.map((g) =>
        h(
          "li",
          {},
          h("strong", {}, g.message),
          g.field ? h("span", { class: "muted" }, ` (field ${g.field})`) : null,
          g.lines.length ? ` · ${lineList(g.lines)}` : null,
        ),
      ),
    ),
    total && total > shown ? h("p", { class: "muted" }, `${formatCount(total)} errors in all; the first ${shown} are listed.`) : null,
  );
}

function lineList(lines) {
  const head = lines.slice(0, 8).join(", ");
  const more = lines.length > 8 ? `, … (${lines.length} rows)` : lines.length > 1 ? ` (${lines.length} rows)` : "";
  return `${lines.length > 1 ? "lines" : "line"} ${head}${more}`;
}
