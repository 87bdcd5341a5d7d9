// Playground: chat with one model (streaming), or one prompt against the base and up to three
// adapters or checkpoints side by side, all streaming at once. Enter sends, Shift+Enter starts a
// new line, Stop ends the replies in flight; an optional system prompt leads every conversation.

import * as api from "../api.js";
import { fill, h, shortModelName } from "../dom.js";

const MAX_ADAPTERS = 3;

export function renderPlayground(main) {
  const abort = new AbortController();
  const chatPanel = h("section", { class: "card", id: "chat", "aria-labelledby": "chat-heading" });
  const comparePanel = h("section", { class: "card", id: "compare", "aria-labelledby": "side-by-side-heading" });
  const maxTokens = h("input", { id: "max-tokens", type: "number", min: 1, max: 4096, value: 128 });
  const temperature = h("input", { id: "temperature", type: "number", min: 0, max: 2, step: 0.1, value: 0 });
  const systemPrompt = h("textarea", { id: "system-prompt", rows: 2, placeholder: "Optional: the system message training used, e.g. “You are a helpful assistant.”" });
  const allCheckpoints = h("input", { type: "checkbox", id: "all-checkpoints" });
  // Both panels read these settings when they send, so a change applies to the next reply.
  const settings = () => ({
    maxTokens: Number(maxTokens.value) || 128,
    temperature: Number(temperature.value) || 0,
    system: systemPrompt.value.trim(),
  });
  main.append(
    h("h1", {}, "Playground"),
    h("section", { class: "card settings", "aria-labelledby": "settings-heading" },
      h("h2", { id: "settings-heading" }, "Settings"),
      h("div", { class: "sampling" },
        h("label", { for: "max-tokens" }, "Max tokens "), maxTokens,
        h("label", { for: "temperature" }, "Temperature "), temperature,
        h("label", { class: "inline" }, allCheckpoints, " List every checkpoint")),
      h("label", { for: "system-prompt" }, "System prompt"),
      systemPrompt),
    chatPanel,
    comparePanel,
  );

  async function load() {
    try {
      const [models, checkpoints] = await Promise.all([api.listModels(), api.listServableCheckpoints()]);
      const choices = { bases: models.filter((m) => !m.parent), adapters: models.filter((m) => m.parent), checkpoints };
      const shown = () => ({ ...choices, checkpoints: allCheckpoints.checked ? checkpoints : latestPerJob(checkpoints) });
      const updates = [buildChat(chatPanel, shown(), settings, abort.signal), buildCompare(comparePanel, shown(), settings, abort.signal)];
      allCheckpoints.addEventListener("change", () => updates.forEach((update) => update(shown())));
    } catch (err) {
      fill(chatPanel, h("h2", { id: "chat-heading" }, "Chat"), h("p", { class: "error", role: "alert" }, `Could not list the models to chat with: ${err.message}`));
    }
  }
  load();
  return () => abort.abort();
}

/** Only each job's newest checkpoint (checkpoints arrive newest first). */
function latestPerJob(checkpoints) {
  const seen = new Set();
  return checkpoints.filter((c) => !seen.has(c.job_id) && seen.add(c.job_id));
}

/** A model picker; `update(choices)` refills it and keeps the chosen model when it is still listed. */
function modelSelect(id, choices, { includeNone = false } = {}) {
  const select = h("select", { id }, modelOptions(choices, includeNone));
  select.update = (next) => {
    const chosen = select.value;
    fill(select, modelOptions(next, includeNone));
    if ([...select.options].some((o) => o.value === chosen)) select.value = chosen;
  };
  return select;
}

/** Options with short labels (the full id in the tooltip); checkpoints grouped by their job. */
function modelOptions({ bases, adapters, checkpoints }, includeNone) {
  const byJob = new Map();
  for (const c of checkpoints) {
    if (!byJob.has(c.job_id)) byJob.set(c.job_id, []);
    byJob.get(c.job_id).push(c);
  }
  const suffixOf = (m) => m.id.split(":")[2] || null;
  return [
    includeNone ? h("option", { value: "" }, "none") : null,
    bases.length ? h("optgroup", { label: "Base models" }, bases.map((m) => h("option", { value: m.id }, m.id))) : null,
    adapters.length
      ? h("optgroup", { label: "Fine-tuned" }, adapters.map((m) =>
        h("option", { value: m.id, title: m.id }, `${shortModelName({ suffix: suffixOf(m), jobId: m.id })} (${m.parent})`)))
      : null,
    [...byJob.values()].map((list) =>
      h("optgroup", { label: `Checkpoints of ${shortModelName({ suffix: list[0].suffix, jobId: list[0].job_id })}` },
        list.map((c) => h("option", { value: c.id, title: `${c.job_id} step ${c.step}` }, `step ${c.step}`)))),
  ];
}

function messageView(role, text = "") {
  return h("div", { class: `message ${role}` }, h("span", { class: "role" }, role), h("div", { class: "content" }, text));
}

/** Enter submits the textarea's form; Shift+Enter (or an IME composition) keeps its newline. */
function enterSends(textarea) {
  textarea.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      textarea.form.requestSubmit();
    }
  });
}

function withSystem(system, messages) {
  return system ? [{ role: "system", content: system }, ...messages] : messages;
}

function buildChat(panel, choices, settings, pageSignal) {
  const select = modelSelect("chat-model", choices);
  const preferred = sessionStorage.getItem("modulora.chatModel");
  if (preferred && [...select.options].some((o) => o.value === preferred)) select.value = preferred;
  else if (choices.adapters.length) select.value = choices.adapters[choices.adapters.length - 1].id;
  const log = h("div", { id: "chat-log", class: "chat-log", role: "log", "aria-live": "polite", tabindex: 0, "aria-label": "Conversation" });
  const input = h("textarea", { id: "chat-input", rows: 2, placeholder: "Say something… (Enter sends, Shift+Enter for a new line)", "aria-label": "Message" });
  const send = h("button", { type: "submit", id: "chat-send" }, "Send");
  const stop = h("button", { type: "button", id: "chat-stop", class: "danger", hidden: true }, "Stop");
  const clear = h("button", { type: "button", id: "chat-clear", class: "secondary" }, "New conversation");
  const error = h("p", { class: "error", role: "alert" });
  let messages = [];
  let running = null;

  const reset = () => {
    running?.abort();
    messages = [];
    log.replaceChildren();
  };
  select.addEventListener("change", reset);
  clear.addEventListener("click", reset);
  stop.addEventListener("click", () => running?.abort());
  pageSignal.addEventListener("abort", () => running?.abort());
  enterSends(input);

  async function submit(event) {
    event.preventDefault();
    const text = input.value.trim();
    if (!text || running) return;
    error.textContent = "";
    input.value = "";
    messages.push({ role: "user", content: text });
    log.append(messageView("user", text));
    const reply = messageView("assistant");
    reply.classList.add("streaming");
    reply.setAttribute("aria-busy", "true");
    log.append(reply);
    const content = reply.querySelector(".content");
    running = new AbortController();
    send.disabled = true;
    stop.hidden = false;
    const { system, ...sampling } = settings();
    try {
      const full = await api.streamChat({
        model: select.value, messages: withSystem(system, messages), signal: running.signal, ...sampling,
        onDelta: (_, all) => {
          content.textContent = all;
          log.scrollTop = log.scrollHeight;
        },
      });
      messages.push({ role: "assistant", content: full });
    } catch (err) {
      if (err.name === "AbortError") {
        // Stopped: keep what arrived, so the conversation can go on from it.
        messages.push({ role: "assistant", content: content.textContent });
        reply.append(h("span", { class: "muted stopped" }, " (stopped)"));
      } else {
        messages.pop();
        error.textContent = `${select.value} did not answer: ${err.message}`;
      }
    } finally {
      running = null;
      reply.classList.remove("streaming");
      reply.removeAttribute("aria-busy");
      reply.dataset.done = "1";
      send.disabled = false;
      stop.hidden = true;
    }
  }

  fill(
    panel,
    h("h2", { id: "chat-heading" }, "Chat"),
    h("label", { for: "chat-model" }, "Model "),
    select,
    log,
    h("form", { class: "chat-form", onsubmit: submit }, input, h("div", { class: "chat-buttons" }, send, stop, clear)),
    error,
  );
  return (next) => select.update(next);
}

function buildCompare(panel, choices, settings, pageSignal) {
  const baseSelect = modelSelect("compare-base", { ...choices, adapters: [], checkpoints: [] });
  const adapterChoices = (all) => ({ ...all, bases: [] });
  const adapterSelects = Array.from({ length: MAX_ADAPTERS }, (_, i) => {
    const s = modelSelect(`compare-adapter-${i}`, adapterChoices(choices), { includeNone: true });
    const adapter = choices.adapters[choices.adapters.length - 1 - i];
    if (adapter) s.value = adapter.id;
    return s;
  });
  const prompt = h("textarea", { id: "compare-prompt", rows: 3, placeholder: "One prompt, answered by each model (Enter sends)", "aria-label": "Prompt for every model" });
  const columns = h("div", { id: "compare-columns", class: "columns", role: "log", "aria-live": "polite", "aria-label": "Answers side by side" });
  const run = h("button", { type: "submit", id: "compare-run" }, "Compare");
  const stop = h("button", { type: "button", id: "compare-stop", class: "danger", hidden: true }, "Stop");
  let running = null;
  stop.addEventListener("click", () => running?.abort());
  pageSignal.addEventListener("abort", () => running?.abort());
  enterSends(prompt);

  async function submit(event) {
    event.preventDefault();
    const text = prompt.value.trim();
    if (!text || running) return;
    const models = [baseSelect.value, ...adapterSelects.map((s) => s.value).filter(Boolean)];
    const { system, ...sampling } = settings();
    running = new AbortController();
    run.disabled = true;
    stop.hidden = false;
    const cells = models.map((model) => {
      const content = h("div", { class: "content" });
      const option = [...adapterSelects, baseSelect].flatMap((s) => [...s.options]).find((o) => o.value === model);
      const column = h("div", { class: "column streaming", dataset: { model }, "aria-busy": "true" },
        h("h3", { title: model }, option?.textContent ?? model), content);
      return { model, content, column };
    });
    fill(columns, cells.map((c) => c.column));
    await Promise.all(
      cells.map(async ({ model, content, column }) => {
        try {
          await api.streamChat({
            model, messages: withSystem(system, [{ role: "user", content: text }]), signal: running.signal, ...sampling,
            onDelta: (_, all) => (content.textContent = all),
          });
        } catch (err) {
          if (err.name === "AbortError") content.append(h("span", { class: "muted stopped" }, " (stopped)"));
          else content.append(h("p", { class: "error" }, `${model} did not answer: ${err.message}`));
        } finally {
          column.classList.remove("streaming");
          column.removeAttribute("aria-busy");
          column.dataset.done = "1";
        }
      }),
    );
    running = null;
    run.disabled = false;
    stop.hidden = true;
  }

  fill(
    panel,
    h("h2", { id: "side-by-side-heading" }, "Side by side"),
    h("form", { class: "compare-form", onsubmit: submit },
      h("div", { class: "selectors" },
        h("label", {}, "Base ", baseSelect),
        adapterSelects.map((s, i) => h("label", {}, `Model ${i + 1} `, s))),
      prompt,
      h("div", { class: "chat-buttons" }, run, stop)),
    columns,
  );
  return (next) => adapterSelects.forEach((s) => s.update(adapterChoices(next)));
}
