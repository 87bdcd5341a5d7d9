// The HTTP client: one function per API operation, the key read from localStorage.
// The key travels only in the Authorization header, never in a URL.

const KEY_NAME = "modulora.apiKey";
const PREPARING_RETRY_S = 3;

// localStorage, so a second tab (or a reload) is signed in too; "Sign out" removes it everywhere.
export function getKey() {
  return localStorage.getItem(KEY_NAME);
}

export function setKey(key) {
  localStorage.setItem(KEY_NAME, key);
}

export function clearKey() {
  localStorage.removeItem(KEY_NAME);
}

/** Another tab signed in or out: `callback()` re-renders this one. */
export function onKeyChange(callback) {
  window.addEventListener("storage", (event) => {
    if (event.key === KEY_NAME || event.key === null) callback();
  });
}

/**
 * An error from the API's `{"error": {message, type, param, code}}` envelope, or one made here
 * for what never reached it: `status` 0 is a network failure, a non-JSON body a proxy's page.
 */
export class ApiError extends Error {
  constructor(status, body) {
    const error = body?.error ?? body ?? {};
    const message = typeof error === "string" ? error : error.message ?? error.detail ?? `HTTP ${status}`;
    super(message);
    this.status = status;
    this.type = error.type ?? null;
    this.param = error.param ?? null;
    this.code = error.code ?? null;
    this.line = error.line ?? lineFromMessage(message);
    this.retryAfterS = error.retry_after_s ?? null;
    this.body = body;
  }

  get network() {
    return this.status === 0;
  }
}

// Upload errors name their line ("line 3: ..."); surface it even when there is no `line` field.
function lineFromMessage(message) {
  const match = /\bline (\d+)/i.exec(message ?? "");
  return match ? Number(match[1]) : null;
}

const NETWORK_MESSAGE = "the server could not be reached (network error)";

/** A short message for a body that is not our JSON: a proxy's HTML error page, or plain text. */
function nonJsonMessage(status, statusText, text) {
  const title = /<title[^>]*>([^<]*)<\/title>/i.exec(text)?.[1]?.trim();
  const plain = title || text.replace(/<[^>]*>/g, " ").replace(/\s+/g, " ").trim();
  const what = status >= 500 ? "the server or a proxy in front of it failed" : "the request was refused";
  const detail = plain && !plain.startsWith("<") ? `: ${plain.slice(0, 120)}` : "";
  return `HTTP ${status}${statusText ? ` ${statusText}` : ""} (${what})${detail}`;
}

function authHeaders(extra = {}) {
  const key = getKey();
  return key ? { Authorization: `Bearer ${key}`, ...extra } : extra;
}

async function parseResponse(response) {
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = { error: { message: nonJsonMessage(response.status, response.statusText, text) } };
  }
  if (!response.ok) {
    if (body === null) body = { error: { message: nonJsonMessage(response.status, response.statusText, "") } };
    throw failure(response.status, body);
  }
  return body;
}

// A 401 means the key was revoked or mistyped: tell the app, which signs out.
function failure(status, body) {
  if (status === 401) window.dispatchEvent(new CustomEvent("modulora:unauthorized"));
  return new ApiError(status, body);
}

/** fetch(), with a failure to connect turned into an ApiError with status 0. */
async function send(url, init) {
  try {
    return await fetch(url, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, { error: { message: NETWORK_MESSAGE } });
  }
}

export async function request(method, path, { json, query, signal } = {}) {
  const url = new URL(path, window.location.origin);
  for (const [name, value] of Object.entries(query ?? {})) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, value);
  }
  const headers = authHeaders(json === undefined ? {} : { "Content-Type": "application/json" });
  const body = json === undefined ? undefined : JSON.stringify(json);
  return parseResponse(await send(url, { method, headers, body, signal }));
}

/**
 * Run `call()`; while the server answers 503 `model_preparing` (a fresh server converting its base
 * model, once), call `onWait(err)` and try again after the delay it asks for.
 */
export async function whilePreparing(call, { onWait, signal } = {}) {
  for (;;) {
    try {
      return await call();
    } catch (err) {
      if (!(err instanceof ApiError) || err.code !== "model_preparing" || signal?.aborted) throw err;
      onWait?.(err);
      await new Promise((resolve) => setTimeout(resolve, 1000 * (err.retryAfterS ?? PREPARING_RETRY_S)));
    }
  }
}

/** Follow `after` cursors until `has_more` is false; returns every item. */
export async function listAll(path, query = {}) {
  const items = [];
  let after;
  for (;;) {
    const page = await request("GET", path, { query: { ...query, limit: 100, after } });
    items.push(...(page?.data ?? []));
    if (!page?.has_more || !page.data?.length) return items;
    after = page.data[page.data.length - 1].id;
  }
}

/** Check `key` against GET /v1/models without storing it (the sign-in form). */
export async function checkKey(key) {
  return parseResponse(await send("/v1/models", { headers: { Authorization: `Bearer ${key}` } }));
}

// ---- files ----------------------------------------------------------------------------------

/**
 * POST /v1/files with an upload progress callback. fetch() cannot report upload progress, so
 * this one request uses XMLHttpRequest. Resolves with the file object, rejects with ApiError
 * (status 0: the upload never reached the server).
 */
export function uploadFile(file, { purpose = "fine-tune", onProgress } = {}) {
  return new Promise((resolve, reject) => {
    const form = new FormData();
    form.append("purpose", purpose);
    form.append("file", file, file.name);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/v1/files");
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
    xhr.upload.onprogress = (event) => {
      if (event.lengthComputable) onProgress?.(event.loaded / event.total);
    };
    xhr.onload = () => {
      let body = null;
      try {
        body = xhr.responseText ? JSON.parse(xhr.responseText) : null;
      } catch {
        body = { error: { message: nonJsonMessage(xhr.status, xhr.statusText, xhr.responseText) } };
      }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else reject(failure(xhr.status, body));
    };
    xhr.onerror = () => reject(new ApiError(0, { error: { message: NETWORK_MESSAGE } }));
    xhr.send(form);
  });
}

export const listFiles = () => listAll("/v1/files", { purpose: "fine-tune" });
export const getFile = (id) => request("GET", `/v1/files/${id}`);
export const deleteFile = (id) => request("DELETE", `/v1/files/${id}`);
export const getFileReport = (id, { model, maxSeqLen } = {}) =>
  request("GET", `/v1/dashboard/files/${id}/report`, { query: { model, max_seq_len: maxSeqLen } });
export const getFilePreview = (id, { model, rows = 3, maxSeqLen } = {}) =>
  request("GET", `/v1/dashboard/files/${id}/preview`, { query: { model, rows, max_seq_len: maxSeqLen } });

// ---- jobs -----------------------------------------------------------------------------------

export const createJob = (body) => request("POST", "/v1/fine_tuning/jobs", { json: body });
export const listJobs = (limit = 100) => request("GET", "/v1/fine_tuning/jobs", { query: { limit } });
export const getJob = (id) => request("GET", `/v1/fine_tuning/jobs/${id}`);
export const cancelJob = (id) => request("POST", `/v1/fine_tuning/jobs/${id}/cancel`);
export const deleteJob = (id) => request("DELETE", `/v1/fine_tuning/jobs/${id}`);
export const listCheckpoints = (id) => listAll(`/v1/fine_tuning/jobs/${id}/checkpoints`);
export const getJobsProgress = () => request("GET", "/v1/dashboard/jobs/progress");
export const getJobLoss = (id) => request("GET", `/v1/dashboard/jobs/${id}/loss`);
export const getJobMessages = (id, after = 0) =>
  request("GET", `/v1/dashboard/jobs/${id}/messages`, { query: { after } }).then((page) => page?.data ?? []);

// ---- keys -----------------------------------------------------------------------------------

export const listKeys = () => request("GET", "/v1/keys").then((page) => page?.data ?? []);
export const createKey = (body) => request("POST", "/v1/keys", { json: body });
export const revokeKey = (id) => request("DELETE", `/v1/keys/${id}`);

// ---- models and dashboard helpers -----------------------------------------------------------

export const listModels = () => request("GET", "/v1/models").then((page) => page?.data ?? []);
export const deleteModel = (id) => request("DELETE", `/v1/models/${encodeURIComponent(id)}`);
export const listServableCheckpoints = () => request("GET", "/v1/dashboard/checkpoints").then((page) => page?.data ?? []);
export const getDashboardOptions = () => request("GET", "/v1/dashboard/options");
export const estimateMemory = (body) => request("POST", "/v1/dashboard/memory_estimate", { json: body });

/** Download an authenticated URL as a file: fetch it, then hand the browser a blob URL. */
export async function download(path, filename) {
  const response = await send(path, { headers: authHeaders() });
  if (!response.ok) await parseResponse(response);
  const blob = await response.blob();
  const url = URL.createObjectURL(blob);
  const link = Object.assign(document.createElement("a"), { href: url, download: filename });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

// ---- server-sent events over fetch ----------------------------------------------------------

/**
 * Read an SSE response with fetch + a stream reader (EventSource cannot send the Authorization
 * header). Calls onOpen() once the server accepted the request, then onEvent({event, data, id})
 * for each event, `data` JSON-decoded when it parses. Resolves when the server closes the stream
 * or `signal` aborts; a dropped connection rejects (ApiError with status 0 when it never opened).
 */
export async function readEventStream(path, { method = "GET", json, onOpen, onEvent, signal, lastEventId } = {}) {
  const headers = authHeaders({ Accept: "text/event-stream" });
  if (json !== undefined) headers["Content-Type"] = "application/json";
  if (lastEventId) headers["Last-Event-ID"] = lastEventId;
  const body = json === undefined ? undefined : JSON.stringify(json);
  const response = await send(path, { method, headers, body, signal });
  if (!response.ok) await parseResponse(response);
  onOpen?.();
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = parseEventBlock(block);
      if (event) onEvent(event);
    }
  }
}

function parseEventBlock(block) {
  const event = { event: "message", data: "", id: null };
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue; // comments are heartbeats
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "data") data.push(value);
    else if (field === "event") event.event = value;
    else if (field === "id") event.id = value;
  }
  if (!data.length) return null;
  event.data = data.join("\n");
  try {
    event.data = JSON.parse(event.data);
  } catch {
    // non-JSON payloads such as "[DONE]" stay strings
  }
  return event;
}

/**
 * Stream a chat completion; onDelta(delta, textSoFar) per chunk. Resolves with the full text.
 * Aborting `signal` (the Stop button) rejects with an AbortError; the text so far was delivered.
 */
export async function streamChat({ model, messages, maxTokens = 128, temperature = 0, onDelta, signal }) {
  let text = "";
  await readEventStream("/v1/chat/completions", {
    method: "POST",
    json: { model, messages, stream: true, max_tokens: maxTokens, temperature },
    signal,
    onEvent: ({ event, data }) => {
      if (data === "[DONE]") return;
      if (event === "error" || data?.error) throw new ApiError(500, data);
      const delta = data?.choices?.[0]?.delta?.content ?? "";
      if (delta) {
        text += delta;
        onDelta?.(delta, text);
      }
    },
  });
  return text;
}
