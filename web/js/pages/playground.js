// Playground: chat with one model (streaming), or one prompt against the base and up to three
// adapters or checkpoints side by side, all streaming at once.

import * as api from "../api.js";
import { fill, h } from "../dom.js";

const MAX_ADAPTERS = 3;

export function renderPlayground(main) {
  const abort = new AbortController();
  const chatPanel = h("section", { class: "card", id: "chat" });
  const comparePanel = h("section", { class: "card", id: "compare" });
  const maxTokens = h("input", { id: "max-tokens", type: "number", min: 1, max: 4096, value: 128 });
  const temperature = h("input", { id: "temperature", type: "number", min: 0, max: 2, step: 0.1, value: 0 });
  // Both panels read the sampling settings when they send, so a change applies to the next reply.
  const sampling = () => ({ maxTokens: Number(maxTokens.value) || 128, temperature: Number(temperature.value) || 0 });
  main.append(
    h("div", { class: "page-head" }, h("h1", {}, "Playground"),
      h("div", { class: "sampling" }, h("label", {}, "Max tokens ", maxTokens), h("label", {}, "Temperature ", temperature))),
    chatPanel,
    comparePanel,
  );

  Promise.all([api.listModels(), api.listServableCheckpoints()])
    .then(([models, checkpoints]) => {
      const bases = models.filter((m) => !m.parent);
      const adapters = models.filter((m) => m.parent);
      buildChat(chatPanel, { bases, adapters, checkpoints, sampling, signal: abort.signal });
      buildCompare(comparePanel, { bases, adapters, checkpoints, sampling, signal: abort.signal });
    })
    .catch((err) => fill(chatPanel, h("p", { class: "error" }, err.message)));
  return () => abort.abort();
}

function modelSelect(id, { bases, adapters, checkpoints }, { includeNone = false } = {}) {
  return h(
    "select",
    { id },
    includeNone ? h("option", { value: "" }, "—") : null,
    h("optgroup", { label: "Base models" }, bases.map((m) => h("option", { value: m.id }, m.id))),
    adapters.length ? h("optgroup", { label: "Fine-tuned" }, adapters.map((m) => h("option", { value: m.id }, `${m.id} (on ${m.parent})`))) : null,
    checkpoints.length
      ? h("optgroup", { label: "Checkpoints" }, checkpoints.map((c) => h("option", { value: c.id }, `${c.job_id} step ${c.step}`)))
      : null,
  );
}

function messageView(role, text = "") {
  return h("div", { class: `message ${role}` }, h("span", { class: "role" }, role), h("div", { class: "content" }, text));
}

function buildChat(panel, { bases, adapters, checkpoints, sampling, signal }) {
  const select = modelSelect("chat-model", { bases, adapters, checkpoints });
  const preferred = sessionStorage.getItem("modulora.chatModel");
  if (preferred && [...select.options].some((o) => o.value === preferred)) select.value = preferred;
  else if (adapters.length) select.value = adapters[adapters.length - 1].id;
  const log = h("div", { id: "chat-log", class: "chat-log" });
  const input = h("textarea", { id: "chat-input", rows: 2, placeholder: "Say something…" });
  const send = h("button", { type: "submit", id: "chat-send" }, "Send");
  const error = h("p", { class: "error", role: "alert" });
  let messages = [];

  select.addEventListener("change", () => {
    messages = [];
    log.replaceChildren();
  });

  async function submit(event) {
    event.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    error.textContent = "";
    input.value = "";
    messages.push({ role: "user", content: text });
    log.append(messageView("user", text));
    const reply = messageView("assistant");
    reply.classList.add("streaming");
    log.append(reply);
    send.disabled = true;
    try {
      const content = reply.querySelector(".content");
      const full = await api.streamChat({
        model: select.value, messages, signal, ...sampling(), onDelta: (_, all) => (content.textContent = all),
      });
      messages.push({ role: "assistant", content: full });
    } catch (err) {
      messages.pop();
      error.textContent = err.message;
    } finally {
      reply.classList.remove("streaming");
      reply.dataset.done = "1";
      send.disabled = false;
    }
  }

  fill(
    panel,
    h("h2", {}, "Chat"),
    h("label", { for: "chat-model" }, "Model "),
    select,
    log,
    h("form", { class: "chat-form", onsubmit: submit }, input, send),
    error,
  );
}

function buildCompare(panel, { bases, adapters, checkpoints, sampling, signal }) {
  const baseSelect = modelSelect("compare-base", { bases, adapters: [], checkpoints: [] });
  const adapterSelects = Array.from({ length: MAX_ADAPTERS }, (_, i) => {
    const s = modelSelect(`compare-adapter-${i}`, { bases: [], adapters, checkpoints }, { includeNone: true });
    if (adapters[adapters.length - 1 - i]) s.value = adapters[adapters.length - 1 - i].id;
    return s;
  });
  const prompt = h("textarea", { id: "compare-prompt", rows: 3, placeholder: "One prompt, answered by each model" });
  const columns = h("div", { id: "compare-columns", class: "columns" });
  const run = h("button", { type: "submit", id: "compare-run" }, "Compare");

  async function submit(event) {
    event.preventDefault();
    const text = prompt.value.trim();
    if (!text) return;
    const models = [baseSelect.value, ...adapterSelects.map((s) => s.value).filter(Boolean)];
    run.disabled = true;
    const cells = models.map((model) => {
      const content = h("div", { class: "content" });
      const column = h("div", { class: "column streaming", dataset: { model } }, h("h3", {}, model), content);
      return { model, content, column };
    });
    fill(columns, cells.map((c) => c.column));
    await Promise.all(
      cells.map(async ({ model, content, column }) => {
        try {
          await api.streamChat({
            model,
            messages: [{ role: "user", content: text }],
            signal,
            ...sampling(),
            onDelta: (_, all) => (content.textContent = all),
          });
        } catch (err) {
          content.append(h("p", { class: "error" }, err.message));
        } finally {
          column.classList.remove("streaming");
          column.dataset.done = "1";
        }
      }),
    );
    run.disabled = false;
  }

  fill(
    panel,
    h("h2", {}, "Side by side"),
    h("form", { class: "compare-form", onsubmit: submit },
      h("div", { class: "selectors" },
        h("label", {}, "Base ", baseSelect),
        adapterSelects.map((s, i) => h("label", {}, `Adapter ${i + 1} `, s))),
      prompt,
      run),
    columns,
  );
}
