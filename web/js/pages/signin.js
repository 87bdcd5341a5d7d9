// Sign-in: check the key against GET /v1/models, keep it in localStorage (this browser, every tab).

import { checkKey, setKey } from "../api.js";
import { h } from "../dom.js";

export function renderSignIn(main, { onSignedIn }) {
  const input = h("input", {
    id: "api-key",
    type: "password",
    autocomplete: "off",
    placeholder: "mlk-…",
    required: true,
    "aria-describedby": "api-key-help",
  });
  const error = h("p", { class: "error", id: "sign-in-error", role: "alert" });
  const button = h("button", { type: "submit" }, "Sign in");

  const form = h(
    "form",
    { class: "card sign-in", id: "sign-in", onsubmit: submit },
    h("h1", {}, "Sign in"),
    h("p", { class: "muted", id: "api-key-help" }, "Paste an API key (", h("code", {}, "modulora keys create --user NAME"),
      " prints one). It stays in this browser until you sign out."),
    h("label", { for: "api-key" }, "API key"),
    input,
    button,
    error,
  );

  async function submit(event) {
    event.preventDefault();
    error.textContent = "";
    button.disabled = true;
    const key = input.value.trim();
    try {
      await checkKey(key);
      setKey(key);
      onSignedIn();
    } catch (err) {
      error.textContent = err.status === 401 ? "That key was not accepted." : `Could not sign in: ${err.message}`;
    } finally {
      button.disabled = false;
    }
  }

  main.append(form);
  input.focus();
}
