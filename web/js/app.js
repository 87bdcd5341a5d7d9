// Entry point: hash router (#/jobs, #/jobs/<id>, ...) and the sign-in gate.
// The route lives in the hash so reloading keeps the page and the key never enters a URL.

import { clearKey, getKey } from "./api.js";
import { renderDatasets } from "./pages/datasets.js";
import { renderJob } from "./pages/job.js";
import { renderJobs } from "./pages/jobs.js";
import { renderNewJob } from "./pages/new-job.js";
import { renderPlayground } from "./pages/playground.js";
import { renderSignIn } from "./pages/signin.js";

const ROUTES = [
  { pattern: /^#\/datasets$/, page: "datasets", render: renderDatasets },
  { pattern: /^#\/new$/, page: "new", render: renderNewJob },
  { pattern: /^#\/jobs$/, page: "jobs", render: renderJobs },
  { pattern: /^#\/jobs\/([\w.:-]+)$/, page: "jobs", render: renderJob },
  { pattern: /^#\/playground$/, page: "playground", render: renderPlayground },
];

const main = document.getElementById("page");
const nav = document.getElementById("nav");
const signOut = document.getElementById("sign-out");

// Each page returns a cleanup function that stops its pollers and streams.
let cleanup = () => {};

function route() {
  cleanup();
  cleanup = () => {};
  main.replaceChildren();
  const signedIn = Boolean(getKey());
  nav.hidden = !signedIn;
  signOut.hidden = !signedIn;
  if (!signedIn) {
    renderSignIn(main, { onSignedIn: route });
    return;
  }
  const hash = window.location.hash || "#/jobs";
  const match = ROUTES.map((r) => ({ r, m: r.pattern.exec(hash) })).find(({ m }) => m);
  if (!match) {
    window.location.hash = "#/jobs";
    return;
  }
  for (const link of nav.querySelectorAll("a")) {
    link.classList.toggle("active", link.dataset.page === match.r.page);
  }
  document.body.dataset.page = match.r.page;
  cleanup = match.r.render(main, ...match.m.slice(1)) ?? (() => {});
}

signOut.addEventListener("click", () => {
  clearKey();
  route();
});

// A 401 on any request: back to sign-in (the sign-in form reports its own failures).
window.addEventListener("modulora:unauthorized", () => {
  clearKey();
  if (!document.getElementById("sign-in")) route();
});

window.addEventListener("hashchange", route);
route();
