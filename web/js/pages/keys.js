// API keys: yours, by prefix (the secrets are never shown again), with expiry and state; create one
// (its secret shown once, to copy) and revoke one. Revoking the key this browser signed in with
// signs it out at its next request.

import * as api from "../api.js";
import { copyButton, fill, formatTime, h } from "../dom.js";

const COLUMNS = ["Name", "Prefix", "Created", "Expires", "State", "Actions"];

function keyState(key) {
  if (key.revoked_at) return `revoked ${formatTime(key.revoked_at)}`;
  if (key.expires_at && key.expires_at * 1000 <= Date.now()) return "expired";
  return "active";
}

export function renderKeys(main) {
  const rows = h("tbody", { id: "key-rows" });
  const listError = h("p", { class: "error", role: "alert", id: "keys-error" });
  const nameInput = h("input", { id: "key-name", maxlength: 100, placeholder: "laptop, CI, …" });
  const daysInput = h("input", { id: "key-expiry", type: "number", min: 1, max: 3650, placeholder: "never" });
  const createError = h("p", { class: "error", role: "alert", id: "key-create-error" });
  const created = h("div", { id: "key-created", "aria-live": "polite" });
  const current = api.getKey() ?? "";

  function row(key) {
    const cell = (label, ...content) => h("td", { dataset: { label } }, ...content);
    const mine = current.startsWith(key.prefix);
    const state = keyState(key);
    return h(
      "tr",
      { dataset: { keyId: key.id } },
      cell("Name", key.name ?? "–", mine ? h("span", { class: "muted" }, " (this browser)") : null),
      cell("Prefix", h("code", {}, `${key.prefix}…`)),
      cell("Created", formatTime(key.created_at)),
      cell("Expires", key.expires_at ? formatTime(key.expires_at) : "never"),
      cell("State", state),
      cell("Actions", state === "active"
        ? h("button", { type: "button", class: "link danger-link", onclick: () => revoke(key, mine),
                        "aria-label": `Revoke the key ${key.prefix}…` }, "Revoke")
        : "–"),
    );
  }

  async function refresh() {
    try {
      const keys = await api.listKeys();
      fill(rows, keys.map(row));
      listError.textContent = "";
    } catch (err) {
      listError.textContent = `Could not list the keys: ${err.message}`;
    }
  }

  async function revoke(key, mine) {
    const warning = mine ? " This browser is signed in with it and will be signed out." : "";
    if (!window.confirm(`Revoke the key ${key.prefix}…? It stops working at once.${warning}`)) return;
    try {
      await api.revokeKey(key.id);
      await refresh(); // with our own key revoked this is a 401, and the app signs out
    } catch (err) {
      listError.textContent = `Could not revoke the key: ${err.message}`;
    }
  }

  async function create(event) {
    event.preventDefault();
    createError.textContent = "";
    const days = daysInput.value ? Number(daysInput.value) : null;
    try {
      const key = await api.createKey({ name: nameInput.value.trim() || null, expires_in_days: days });
      fill(created,
        h("p", {}, "Copy the new key now: it is not shown again."),
        h("p", {}, h("code", { id: "new-key-secret" }, key.key), " ", copyButton(key.key, "Copy the new key")));
      nameInput.value = "";
      daysInput.value = "";
      await refresh();
    } catch (err) {
      createError.textContent = `Could not create the key: ${err.message}`;
    }
  }

  main.append(
    h("h1", {}, "API keys"),
    h("section", { class: "card", "aria-labelledby": "create-key-heading" },
      h("h2", { id: "create-key-heading" }, "New key"),
      h("form", { id: "create-key", onsubmit: create },
        h("label", { for: "key-name" }, "Name (optional)"), nameInput,
        h("label", { for: "key-expiry" }, "Expires after (days, optional)"), daysInput,
        h("button", { type: "submit" }, "Create key")),
      createError, created),
    h("section", { class: "card", "aria-labelledby": "keys-heading" },
      h("h2", { id: "keys-heading" }, "Your keys"),
      h("div", { class: "table-wrap" },
        h("table", { class: "responsive keys" },
          h("thead", {}, h("tr", {}, COLUMNS.map((t) => h("th", { scope: "col" }, t)))),
          rows)),
      listError),
  );
  refresh();
}
