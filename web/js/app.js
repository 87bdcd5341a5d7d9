// Entry point: hash router (#/jobs, #/jobs/<id>, ...), page titles and focus, and the sign-in gate.
// The route lives in the hash so reloading keeps the page and the key never enters a URL.

import { clearKey, getKey, onKeyChange } from "./api.js";
import { renderCompare } from "./pages/compare.js";
import { renderDatasets } from "./pages/datasets.js";
import { renderJob } from "./pages/job.js";
import { renderJobs } from "./pages/jobs.js";
import { renderKeys } from "./pages/keys.js";
import { renderNewJob } from "./pages/new-job.js";
import { renderPlayground } from "./pages/playground.js";
import { renderSignIn } from "./pages/signin.js";

const ROUTES = [
  { pattern: /^#\/datasets$/, page: "datasets", title: () => "Datasets", render: renderDatasets },
  { pattern: /^#\/new$/, page: "new", title: () => "New job", render: renderNewJob },
  { pattern: /^#\/jobs$/, page: "jobs", title: () => "Jobs", render: renderJobs },
  { pattern: /^#\/jobs\/([\w.:-]+)$/, page: "job", title: (id) => `Job ${id}`, render: renderJob },
  { pattern: /^#\/compare(?:\/([\w.,:-]*))?$/, page: "compare", title: () => "Compare runs", render: renderCompare },
  { pattern: /^#\/playground$/, page: "playground", title: () => "Playground", render: renderPlayground },
  { pattern: /^#\/keys$/, page: "keys", title: () => "API keys", render: renderKeys },
];
const NAV_PAGE = { job: "jobs" };

const main = document.getElementById("page");
const nav = document.getElementById("nav");
const navToggle = document.getElementById("nav-toggle");
const signOut = document.getElementById("sign-out");

// Each page returns a cleanup function that stops its pollers and streams.
let cleanup = () => {};
let firstRoute = true;
let signedInShown = null;

function setNavOpen(open) {
  nav.classList.toggle("open", open);
  navToggle.setAttribute("aria-expanded", String(open));
}

function route() {
  cleanup();
  cleanup = () => {};
  main.replaceChildren();
  setNavOpen(false);
  const signedIn = Boolean(getKey());
  signedInShown = signedIn;
  nav.hidden = !signedIn;
  navToggle.hidden = !signedIn;
  if (!signedIn) {
    document.title = "Sign in · ModuLoRA";
    document.body.dataset.page = "sign-in";
    renderSignIn(main, { onSignedIn: route });
    return;
  }
  const hash = window.location.hash || "#/jobs";
  const match = ROUTES.map((r) => ({ r, m: r.pattern.exec(hash) })).find(({ m }) => m);
  if (!match) {
    window.location.hash = "#/jobs";
    return;
  }
  const args = match.m.slice(1);
  for (const link of nav.querySelectorAll("a")) {
    const current = link.dataset.page === (NAV_PAGE[match.r.page] ?? match.r.page);
    link.classList.toggle("active", current);
    if (current) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `${match.r.title(...args)} · ModuLoRA`;
  document.body.dataset.page = match.r.page;
  cleanup = match.r.render(main, ...args) ?? (() => {});
  // A screen reader or keyboard user lands on the new page's heading, not on a link left behind.
  const heading = main.querySelector("h1");
  if (heading && !firstRoute) {
    heading.tabIndex = -1;
    heading.focus();
  }
  firstRoute = false;
}

navToggle.addEventListener("click", () => setNavOpen(!nav.classList.contains("open")));
// A link to the page already shown changes no hash: close the menu here too.
nav.addEventListener("click", (event) => event.target.closest("a") && setNavOpen(false));

signOut.addEventListener("click", () => {
  clearKey();
  route();
});

// A 401 on any request: back to sign-in (the sign-in form reports its own failures).
window.addEventListener("modulora:unauthorized", () => {
  clearKey();
  if (!document.getElementById("sign-in")) route();
});

// Signed in or out in another tab.
onKeyChange(() => Boolean(getKey()) !== signedInShown && route());
window.addEventListener("hashchange", route);
route();
